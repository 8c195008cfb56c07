"""Loading the base model, 4-bit quantisation and LoRA.

Any Hugging Face causal LM loads by hub id or local path through ``from_pretrained``; ``tiny`` names the
embedded tiny model (built offline on first use and cached).  ``quantization="nf4"`` loads the base in
bitsandbytes 4-bit NF4 with double quantisation and the given compute dtype (QLoRA); LoRA adapters (default:
every linear layer but the LM head) are the only trainable weights.  A stage can start from an earlier stage's
adapter (SA from CM, DE from SA), which then stays trainable.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY = "tiny"


@dataclass
class BaseModelSettings:
    """The frozen base model.

    Args:
        name_or_path: hub id, local folder, or ``tiny`` for the embedded tiny model.
        quantization: ``nf4`` (4-bit QLoRA base) or ``none``.
        dtype: dtype of the (non-quantised) weights.
        compute_dtype: dtype of 4-bit matmuls (nf4 only).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        attn_implementation: passed to ``from_pretrained`` (``sdpa``, ``eager``, ``flash_attention_2``); None keeps the default.
    """

    name_or_path: str = TINY
    quantization: Literal["none", "nf4"] = "none"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None


@dataclass
class LoRASettings:
    """LoRA adapters, the trainable part.

    Args:
        r: rank.
        alpha: scaling numerator (scale = alpha / r).
        dropout: dropout on the adapter input.
        target_modules: ``all-linear`` (every linear layer but the LM head) or a list of module names.
        init_adapter: folder of an earlier stage's adapter (PEFT format) to start from.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"
    init_adapter: Optional[str] = None

    def __post_init__(self):
        # ``--model.init_args.lora.init_adapter null`` on a command line arrives as a string
        if isinstance(self.init_adapter, str) and self.init_adapter.strip().lower() in ("", "none", "null"):
            self.init_adapter = None


def tiny_model_cache() -> Path:
    return Path(os.environ.get("PROUIE_CACHE", Path.home() / ".cache" / "prouie_pl"))


def resolve_model_path(name_or_path: str) -> str:
    """``tiny`` -> the cached embedded tiny model (built on first use); anything else unchanged."""
    if name_or_path != TINY:
        return name_or_path
    from .demo_data import demo_data_dir
    from .tiny_model import build_tiny_model

    digest = hashlib.sha1()
    for p in sorted(demo_data_dir().rglob("*.json")):
        digest.update(p.read_bytes())
    digest.update(Path(__file__).with_name("tiny_model.py").read_bytes())
    folder = tiny_model_cache() / f"tiny-{digest.hexdigest()[:12]}"
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        build_tiny_model(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race; use its copy
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(base: BaseModelSettings, lora: Optional[LoRASettings], device: Optional[torch.device] = None):
    """The base model (4-bit or not) with LoRA adapters; returns a ``PeftModel`` (or the bare model without LoRA)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(base.name_or_path)
    kwargs: dict = {"dtype": DTYPES[base.dtype]}
    if base.attn_implementation:
        kwargs["attn_implementation"] = base.attn_implementation
    if base.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[base.compute_dtype],
        )
        kwargs["device_map"] = {"": str(device) if device is not None else "cpu"}
    elif base.quantization != "none":
        raise ValueError(f"model.base.quantization must be 'nf4' or 'none', not {base.quantization!r}")
    elif device is not None and device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    if base.quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=base.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif base.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    for p in model.parameters():
        p.requires_grad_(False)
    if lora is None:
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if lora.init_adapter:
        if not (Path(lora.init_adapter) / "adapter_config.json").is_file():
            raise ValueError(f"model.lora.init_adapter {lora.init_adapter!r} is not a PEFT adapter folder (no adapter_config.json)")
        return PeftModel.from_pretrained(model, lora.init_adapter, is_trainable=True)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def decoder_and_head(model):
    """(decoder, lm_head) of a causal LM, through a PEFT wrapper if there is one.

    Losses run the decoder for hidden states and apply the LM head themselves (chunked, only at the
    positions that count), so the full logits tensor is never built.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


def lora_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def base_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" not in n}
