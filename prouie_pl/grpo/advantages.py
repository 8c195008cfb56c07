"""The advantage piece of a GRPO step: per-token advantages from the rewards of each group of G completions.

* ``stepwise`` (default; DeepSeekMath's process supervision): every SFR step reward of a group is normalised
  together, and a token's advantage is the sum of the normalised rewards of the steps ending at or after it;
* ``outcome``: the outcome rewards are normalised within the group (``scale``: by the group's std, the batch's,
  or not at all) and the completion's value goes on every one of its tokens.

The arithmetic is the kernels' (:func:`prouie_pl.kernels.stepwise_advantages`,
:func:`prouie_pl.kernels.group_advantages`); this module lays the rewards out for them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..kernels import group_advantages, stepwise_advantages
from ..rewards import RewardResult

ADVANTAGE_MODES = ("stepwise", "outcome")


def token_advantages(rewards: Sequence[RewardResult], completion_mask: torch.Tensor, group_size: int, mode: str = "stepwise",
                     scale: str = "group") -> torch.Tensor:
    """[N, L] float32 advantages for N completions of width L (groups of ``group_size`` consecutive rows)."""
    n, length = completion_mask.shape
    device = completion_mask.device
    if mode == "outcome":
        outcomes = torch.tensor([r.outcome for r in rewards], dtype=torch.float32, device=device)
        return group_advantages(outcomes, group_size, scale=scale).unsqueeze(1).expand(n, length).contiguous()
    if mode != "stepwise":
        raise ValueError(f"advantage mode must be one of {', '.join(ADVANTAGE_MODES)}, not {mode!r}")
    s = max(len(r.steps) for r in rewards)
    step_rewards = torch.zeros(n, s, dtype=torch.float32)
    step_ends = torch.zeros(n, s, dtype=torch.long)
    step_mask = torch.zeros(n, s, dtype=torch.bool)
    for i, r in enumerate(rewards):
        for j, (end, value) in enumerate(r.steps):
            step_rewards[i, j], step_ends[i, j], step_mask[i, j] = value, end, True
    return stepwise_advantages(step_rewards.to(device), step_ends.to(device), step_mask.to(device), group_size, length)
