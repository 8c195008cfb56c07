"""The optimizers the SFT and GRPO modules build (their learning-rate schedules come from ``transformers``)."""

from __future__ import annotations

from typing import Iterable

import torch

OPTIMIZERS = ("adamw", "paged_adamw_8bit")


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, betas: tuple[float, float], weight_decay: float):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check the model.lora settings")
    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name != "adamw":
        raise ValueError(f"model.optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
