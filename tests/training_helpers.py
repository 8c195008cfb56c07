"""Helpers for the training tests: stage configs derived from the shipped ones, in-process runs."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
QUIET_TRAINER = {"trainer.enable_progress_bar": False, "trainer.enable_model_summary": False}


def stage_config(base: str, out: Path, **changes) -> Path:
    """A copy of ``configs/tiny/<base>.yaml`` with dotted keys changed (``"trainer.max_epochs": 3``); None deletes."""
    cfg = yaml.safe_load((REPO / "configs" / "tiny" / f"{base}.yaml").read_text())
    for dotted, value in changes.items():
        node = cfg
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def column(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def assert_config_error(argv: list[str], capsys, expected: str) -> None:
    """``python -m prouie_pl ARGV`` exits with status 2 and a message holding ``expected``, without a traceback."""
    from prouie_pl.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argument errors exit from the parser
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert "Traceback" not in err


def dequantised_base(model) -> dict[str, torch.Tensor]:
    """What each 4-bit weight means (float32), whatever byte layout bitsandbytes keeps it in."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            data, state = module.weight.data.clone(), copy.deepcopy(module.weight.quant_state)
            if getattr(state, "packing_format_for_cpu", False):
                data, state = F._convert_weight_packed_for_cpu_inverse(data, state)
            out[name] = F.dequantize_4bit(data, state).float()
    return out


@contextmanager
def single_thread(deterministic: bool = False):
    """One torch thread (and, if asked, torch's deterministic algorithms) for the duration; restored after."""
    threads, was_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_deterministic)



def tiny_gemma3(pad_id: int = 0):
    """A tiny randomly initialised Gemma 3 (seeded, no download) whose sliding-window layers (window 6) are shorter
    than the prompts the tests use, so its hybrid cache drops positions."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, sliding_window=6,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                              max_position_embeddings=256, pad_token_id=pad_id, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config)
