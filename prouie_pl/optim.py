"""Optimizers and learning-rate schedules shared by the SFT and GRPO modules."""

from __future__ import annotations

import math
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


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.0):
    """LambdaLR factor: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def warmup_constant(warmup: int):
    """LambdaLR factor: linear warm-up, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
