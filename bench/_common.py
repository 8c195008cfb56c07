"""Helpers shared by the benchmark scripts: where the real data is, machine facts, writing tables."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED_DATA = Path(os.environ.get("PROUIE_SHARED_DATA", REPO.parent / "shared" / "data" / "uie"))


def require_shared_data() -> Path:
    if not (SHARED_DATA / "NER").is_dir():
        sys.exit(f"this benchmark needs the real data at {SHARED_DATA} (set PROUIE_SHARED_DATA)")
    return SHARED_DATA


def machine_line() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{dev}; Python {platform.python_version()}; torch {torch.__version__}; {platform.machine()}"


def model_defaults(args, real_datasets) -> int:
    """Fill ``--dtype``, ``--data_dir`` and ``--datasets`` for ``--model`` (tiny: float32 on the demo data; a real
    model: ``auto`` on ``real_datasets`` of the shared data) and return the torch thread count (tiny: 1; else
    torch's choice, 0) unless ``--threads`` gives one."""
    tiny = args.model == "tiny"
    args.dtype = args.dtype or ("float32" if tiny else "auto")
    if args.data_dir is None:
        args.data_dir = "demo" if tiny else str(require_shared_data())
        if not tiny and args.datasets is None:
            args.datasets = real_datasets
    return (1 if tiny else 0) if args.threads is None else args.threads


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:,.2f}" if abs(x) < 1e6 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


NOTES_HEADING = "## Notes"


SECTION_OPEN = "<!-- section: {} -->"
SECTION_CLOSE = "<!-- /section -->"


def _sections(text: str) -> dict[str, str]:
    """The ``<!-- section: KEY -->`` ... ``<!-- /section -->`` blocks of a results file, in file order."""
    out, at = {}, 0
    head = SECTION_OPEN.split("{}")[0]
    while (start := text.find(head, at)) >= 0:
        key_end = text.index("-->", start)
        key = text[start + len(head):key_end].strip()
        end = text.find(SECTION_CLOSE, key_end)
        end = len(text) if end < 0 else end + len(SECTION_CLOSE)
        out[key] = text[start:end]
        at = end
    return out


def write_result(name: str, title: str, body: str, out: str | None = None, keep_notes: bool = False,
                 section: str | None = None, heading: str | None = None) -> Path:
    """Write a results file.  With ``keep_notes`` the file ends with a ``## Notes`` section that people write:
    the one already in the file (kept word for word when the script rewrites it) or an empty one.

    With ``section`` the file holds one block per key (one per model, say), each with its own ``heading`` and
    machine line: the block of this key is replaced and the others are kept as they are."""
    path = Path(out) if out else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if section is not None:
        blocks = _sections(path.read_text(encoding="utf-8")) if path.is_file() else {}
        blocks[section] = (f"{SECTION_OPEN.format(section)}\n\n## {heading or section}\n\n{machine_line()}\n\n"
                           f"{body.rstrip()}\n\n{SECTION_CLOSE}")
        text = f"# {title}\n\n" + "\n\n".join(blocks.values()) + "\n"
        path.write_text(text, encoding="utf-8")
        print(blocks[section])
        print(f"written to {path} (section {section}; {len(blocks)} in the file)")
        return path
    if keep_notes:
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        at = old.find("\n" + NOTES_HEADING + "\n")
        notes = old[at + 1:].rstrip() if at >= 0 else f"{NOTES_HEADING}\n\n(written by hand after the run)"
        body = f"{body.rstrip()}\n\n{notes}"
    text = f"# {title}\n\n{machine_line()}\n\n{body}\n"
    path.write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {path}")
    return path


def fit_steps(module, data, max_steps: int, callbacks=()):
    """Train ``module`` for exactly ``max_steps`` optimizer steps on the CPU, with no validation, logger,
    checkpoints or progress bar (the timed runs of the benchmarks); returns the trainer."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=max_steps, max_epochs=1000,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=list(callbacks))
    from prouie_pl.wiring import connect

    connect(module, data, trainer)
    trainer.fit(module, datamodule=data)
    return trainer


def sft_warmup_adapter(out, steps: int, seed: int, model: str = "tiny", dtype: str = "float32", **data_kwargs):
    """A short SFT run (lr 1e-3, LoRA r=16 / alpha 32 / no dropout on every linear layer) from a fresh adapter on
    the base ``model`` (frozen weights stored in ``dtype``), so that GRPO benchmarks start from answers that differ
    in quality; ``data_kwargs`` go to ``UIEDataModule`` (stage ``sa``, batch size 8).  Saves the adapter to ``out``
    and returns it."""
    import lightning as L

    from prouie_pl.datamodules import UIEDataModule
    from prouie_pl.modeling import BaseModelSettings, LoRASettings
    from prouie_pl.sft import SFTModule

    L.seed_everything(seed, verbose=False)
    module = SFTModule(base=BaseModelSettings(name_or_path=model, dtype=dtype), lora=LoRASettings(r=16, alpha=32, dropout=0.0),
                       learning_rate=1e-3, warmup_ratio=0.05)
    data = UIEDataModule(stage="sa", batch_size=8, max_val_records=0, seed=seed, **data_kwargs)
    fit_steps(module, data, steps)
    module.save_adapter(str(out))
    return out
