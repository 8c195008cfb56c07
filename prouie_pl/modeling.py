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
GEMMA = "gemma-3-270m"
EMBEDDED_MODELS = (TINY, GEMMA)


@dataclass
class BaseModelSettings:
    """The frozen base model.

    Args:
        name_or_path: hub id, local folder, or an embedded model: ``tiny`` (small offline Llama) or
            ``gemma-3-270m`` (Gemma 3 270M from the ``gemma`` extra's registry package).
        quantization: ``nf4`` (4-bit QLoRA base) or ``none``.
        dtype: dtype of the frozen (non-quantised) base weights; LoRA weights stay float32.  ``auto``: bfloat16
            where matmuls run natively in it (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else float32.
        compute_dtype: dtype of 4-bit matmuls (nf4 only).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        attn_implementation: passed to ``from_pretrained`` (``sdpa``, ``eager``, ``flash_attention_2``); None keeps the default.
    """

    name_or_path: str = TINY
    quantization: Literal["none", "nf4"] = "none"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
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


def model_cache() -> Path:
    """Where embedded models are built and kept: ``$PROUIE_CACHE``, else ``~/.cache/prouie_pl``."""
    return Path(os.environ.get("PROUIE_CACHE", Path.home() / ".cache" / "prouie_pl"))


def cached_build(folder: Path, build) -> Path:
    """``folder`` if it holds a model already, else ``build(tmp)`` into a private temporary folder renamed into place.

    Safe against two processes at once: each builds in its own folder and the first rename wins.  The build
    runs with the caller's random state saved and restored, so building a model on first use leaves a seeded
    run exactly where a run that found the cache would be.
    """
    import random
    import shutil

    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        random.setstate(py_state)
    try:
        tmp.rename(folder)
    except OSError:  # another process won the race; use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model_path(name_or_path: str) -> str:
    """Embedded names -> cached folders (built on first use); anything else unchanged.

    ``tiny``: the small offline Llama (:mod:`prouie_pl.tiny_model`); ``gemma-3-270m``: Gemma 3 270M converted
    from the registry package's GGUF (:mod:`prouie_pl.gemma_base`).
    """
    if name_or_path == GEMMA:
        from . import gemma_base

        folder = model_cache() / gemma_base.cache_key()
        return str(cached_build(folder, gemma_base.convert))
    if name_or_path != TINY:
        return name_or_path
    from .demo_data import demo_data_files
    from .tiny_model import build_tiny_model

    digest = hashlib.sha1()
    for p in demo_data_files():
        digest.update(p.read_bytes())
    digest.update(Path(__file__).with_name("tiny_model.py").read_bytes())
    folder = model_cache() / f"tiny-{digest.hexdigest()[:12]}"
    return str(cached_build(folder, build_tiny_model))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: Optional[torch.device] = None) -> torch.dtype:
    """The torch dtype for ``model.base.dtype`` (``auto`` decided by the hardware the run is on)."""
    if name != "auto":
        return DTYPES[name]
    if device is not None and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def input_embedding_on_disk(path: str) -> Optional[torch.Tensor]:
    """The input embedding matrix of the safetensors weights in folder ``path`` (memory-mapped, only that tensor),
    or None when the folder holds none (a hub id, an adapter folder, other weight formats)."""
    import json

    folder = Path(path)
    if not folder.is_dir():
        return None
    files = [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [folder / f for k, f in weight_map.items() if k.endswith(EMBEDDING_SUFFIXES)]
    from safetensors import safe_open

    for file in files:
        if not file.is_file():
            continue
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.endswith(EMBEDDING_SUFFIXES):
                    return f.get_tensor(key)
    return None


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model, with the chat format the model can write (:func:`prouie_pl.chat.adapt_chat_format`:
    a base model whose turn-end marker has an untrained embedding row gets the plain format, answers ending
    with ``eos``); the decision needs the weights on disk, and :func:`prouie_pl.chat.check_answer_end` repeats
    it on the loaded model."""
    from transformers import AutoTokenizer

    from .chat import adapt_chat_format

    path = resolve_model_path(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if getattr(tok, "chat_template", None):
        adapt_chat_format(tok, input_embedding_on_disk(path), name_or_path)
    return tok


def load_model(base: BaseModelSettings, lora: Optional[LoRASettings], device: Optional[torch.device] = None):
    """The base model (4-bit or not) with LoRA adapters; returns a ``PeftModel`` (or the bare model without LoRA)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(base.name_or_path)
    kwargs: dict = {"dtype": resolve_dtype(base.dtype, device)}
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
        keep_trainable_4bit_layout(model)
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
        peft_model = PeftModel.from_pretrained(model, lora.init_adapter, is_trainable=True)
        check_adapter_keys(peft_model, read_adapter_weights(lora.init_adapter), lora.init_adapter)
    else:
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                            bias="none", task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
    return peft_model


def read_adapter_weights(folder: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter folder (``adapter_model.safetensors``, else ``adapter_model.bin``)."""
    path = Path(folder)
    st = path / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu")
    raise ValueError(f"adapter {folder}: neither adapter_model.safetensors nor adapter_model.bin")


def check_adapter_keys(model, weights: dict, folder: Union[str, Path]) -> None:
    """Raise unless ``weights`` (an adapter file's tensors) holds exactly the adapter tensors ``model`` has.

    A LoRA tensor missing from the file would keep its fresh initialisation (B = 0) and the adapter would load
    half-way, which looks like a collapsed model, not like an error; a tensor the model lacks means another
    layout.  PEFT itself only warns on either."""
    from peft import get_peft_model_state_dict

    expected = set(get_peft_model_state_dict(model))
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing:
        raise ValueError(f"adapter {folder} lacks {len(missing)} of the {len(expected)} adapter tensors this model has, "
                         f"e.g. {missing[:2]}: the file is incomplete or was saved from another LoRA layout "
                         "(model.lora.r / target_modules)")
    if unexpected:
        raise ValueError(f"adapter {folder} does not fit this model: {len(unexpected)} tensors it has no place for, "
                         f"e.g. {unexpected[:2]}")


def keep_trainable_4bit_layout(model) -> int:
    """Switch off bitsandbytes' CPU inference repack of 4-bit weights; returns how many layers it touched.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) rewrites a ``Linear4bit`` weight in place the first time the
    layer runs in eval mode without gradients (every validation decode and GRPO rollout): a tiled layout, the
    double-quantised absmax expanded and rounded to bf16.  It never converts back, and in that layout
    ``matmul_4bit`` calls a kernel without autograd, so later training passes lose the gradient through the
    frozen base and run on slightly different weights.  Measured on the tiny model (nf4, LoRA r=8), after one
    eval forward: LoRA gradients off by 121% (relative norm), loss off by 6e-4, dequantised weights moved by up
    to 4e-4; with the repack off, bit-identical to a run that never entered eval mode.  Training therefore keeps
    the layout it trains in; inference-only callers may leave the repack on for speed.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def decoder_and_head(model):
    """(decoder, lm_head) of a causal LM, through a PEFT wrapper if there is one.

    Losses run the decoder for hidden states and apply the LM head themselves (chunked, only at the
    positions that count), so the full logits tensor is never built.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


def checkpointing_active(model) -> bool:
    """True where a forward pass now would checkpoint its layers (gradients on, a layer in train mode with
    gradient checkpointing enabled).  transformers then drops the KV cache inside those layers, so a pass that
    hands a cache from one decoder call to the next (:mod:`prouie_pl.shared_prefix`) cannot run."""
    if not torch.is_grad_enabled():
        return False
    return any(getattr(m, "gradient_checkpointing", False) is True and m.training for m in model.modules())


def base_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" not in n}


def cast_frozen_base(model, dtype: torch.dtype) -> int:
    """Cast the frozen floating-point base weights to ``dtype`` in place; return how many tensors changed.

    For decode-heavy work after training: on a CPU where a bf16 base trains faster but decodes slower than
    float32, the same (bf16-rounded) values computed in float32 give the same model, faster.  Trainable
    parameters (LoRA) and quantised 4-bit weights are left as they are.
    """
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n
