"""``python -m prouie_pl export``: merge a LoRA adapter into its base and save a plain Hugging Face model.

The base is loaded in bf16 (or the ``--dtype`` asked for), never 4-bit: merging into quantised weights would
round the adapter away.  The output folder loads with ``AutoModelForCausalLM.from_pretrained`` and needs no
PEFT; the adapter's tokenizer and its ``answer_format.json`` are saved beside it.
"""

from __future__ import annotations

from pathlib import Path

from .formats import read_answer_format, write_answer_format
from .modeling import DTYPES, resolve_model_path


def export_merged(adapter: str, base: str, out: str, dtype: str = "bfloat16") -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"--adapter {adapter!r} is not a PEFT adapter folder (no adapter_config.json)")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(base), dtype=DTYPES[dtype])
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.to(DTYPES[dtype])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    tok_src = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else resolve_model_path(base)
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(out_dir)
    fmt = read_answer_format(adapter)
    if fmt is not None:  # the merged model writes what its adapter was trained to write
        write_answer_format(out_dir, fmt)
    return out_dir
