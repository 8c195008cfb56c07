"""``Trajectory``: what one batch of rollouts becomes before the loss sees it, and the micro-batches it is cut into.

A GRPO step builds one from a :class:`~prouie_pl.grpo.rollout.Rollout` (token ids and masks of prompts and
completions), the SFR rewards of its completions (:mod:`.rewarding`) and their per-token advantages
(:mod:`.advantages`); the no-grad passes then add the log-probabilities the loss compares against (the
sampling policy's when there is more than one update pass, the reference's when ``beta > 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..rewards import RewardResult
from .rollout import Rollout


@dataclass
class Trajectory:
    """N = P x G completions (consecutive rows form a group of G) with everything the GRPO loss needs."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, L] right-padded
    completion_mask: torch.Tensor  # [N, L] 1 up to and including the stop token
    truncated: torch.Tensor  # [N] bool: no stop token within the length limit
    rewards: list[RewardResult]  # per completion: SFR steps, outcome, F1, parse flag
    advantages: torch.Tensor  # [N, L] float32 per-token advantages
    group_size: int
    old_logprobs: Optional[torch.Tensor] = None  # [N, L] sampling policy (kept when num_iterations > 1)
    ref_logprobs: Optional[torch.Tensor] = None  # [N, L] reference policy (the base without the adapter)

    @classmethod
    def from_rollout(cls, rollout: Rollout, rewards: list[RewardResult], advantages: torch.Tensor, group_size: int) -> "Trajectory":
        return cls(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask, rollout.truncated,
                   rewards, advantages, group_size)

    @property
    def size(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def completion_length(self) -> int:
        """Width L of the completion tensors (the loss's ``max_completion_length``)."""
        return self.completion_ids.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)

    @property
    def tokens(self) -> float:
        """Completion tokens of the whole trajectory (what ``bnpo`` and ``dapo`` normalise by)."""
        return float(self.completion_mask.sum())

    def rows_with_signal(self) -> torch.Tensor:
        """[N] bool: completions with a non-zero advantage on some token."""
        return (self.advantages.abs() * self.completion_mask).sum(dim=1) > 0

    def groups_with_signal(self) -> torch.Tensor:
        """[P] bool: groups with reward spread (some completion with a non-zero advantage)."""
        return self.rows_with_signal().view(-1, self.group_size).any(dim=1)

    def all_rows(self) -> torch.Tensor:
        return torch.arange(self.size, device=self.completion_ids.device)


def micro_batches(rows: torch.Tensor, size: Optional[int]) -> list[torch.Tensor]:
    """``rows`` (indices) in consecutive pieces of at most ``size`` (None: all at once; nothing for no rows)."""
    if len(rows) == 0:
        return []
    step = size or len(rows)
    return [rows[s:s + step] for s in range(0, len(rows), step)]
