"""The optimizers the SFT and GRPO modules build, and the SFT learning-rate schedule.

The SFT schedule is linear warm-up then cosine decay to a floor, over the optimizer steps the run plans
(``transformers``' ``get_cosine_with_min_lr_schedule_with_warmup``, same values).  A stage may also end on
time (``trainer.max_time``) before its planned steps: the schedule then follows whichever end comes first, the
step count or the clock (each step's progress is the larger of steps done / planned and the share of
``max_time`` spent, one mean step ahead), so a stage cut by time still ends at its floor rate instead of
stopping halfway down the cosine.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

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


def cosine_factor(progress: float, warmup: float, floor: float) -> float:
    """Share of the peak rate at ``progress`` (0..1) of a stage: linear warm-up over the first ``warmup`` of it,
    then cosine decay from 1 to ``floor``."""
    if progress < warmup:
        return progress / warmup
    rest = min(1.0, (progress - warmup) / max(1e-12, 1.0 - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * rest))


def stage_progress(step: int, total: int, elapsed: Optional[float] = None, duration: Optional[float] = None) -> float:
    """How far a stage is after ``step`` optimizer steps of ``total`` planned: the step share, or, when the
    stage has a time limit (``duration`` s, ``elapsed`` s spent), the share of time the next step will end at
    (a mean step ahead), whichever is larger."""
    p = step / max(1, total)
    if duration and elapsed is not None and step > 0:
        p = max(p, elapsed * (step + 1) / step / duration)
    return min(1.0, p)


def warmup_cosine_schedule(optimizer, total: int, warmup_ratio: float, floor: float,
                           clock: Optional[Callable[[], tuple[float, Optional[float]]]] = None):
    """``LambdaLR``: warm-up over ``int(warmup_ratio * total)`` steps, cosine to ``floor`` x the peak at ``total``;
    ``clock()`` returns (seconds elapsed, time limit in seconds or None) when the stage can also end on time."""
    total = max(1, total)
    warmup = int(warmup_ratio * total) / total

    def factor(step: int) -> float:
        elapsed, duration = clock() if clock is not None else (None, None)
        return cosine_factor(stage_progress(step, total, elapsed, duration), warmup, floor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainer_clock(trainer) -> Optional[Callable[[], tuple[float, Optional[float]]]]:
    """(elapsed, limit) in seconds from the ``Timer`` Lightning adds for ``trainer.max_time``; None without one."""
    from lightning.pytorch.callbacks import Timer

    timer = next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, Timer)), None)
    if timer is None or timer.time_remaining() is None:
        return None

    def clock() -> tuple[float, Optional[float]]:
        elapsed = timer.time_elapsed()
        return elapsed, elapsed + timer.time_remaining()

    return clock
