"""The reward piece of a GRPO step: SFR rewards (:func:`prouie_pl.rewards.sfr_reward`) of every sampled
completion, read from its tokens up to and including the stop token, against the gold record of its prompt."""

from __future__ import annotations

from typing import Sequence

from ..rewards import RewardResult, RewardSettings, completion_token_ends, sfr_reward
from ..schema import Record
from .rollout import Rollout


def rollout_rewards(tokenizer, rollout: Rollout, records: Sequence[Record], settings: RewardSettings) -> list[RewardResult]:
    """One :class:`~prouie_pl.rewards.RewardResult` per completion; ``records`` holds the gold record of each
    completion's prompt (one per row)."""
    lengths = rollout.lengths.tolist()
    ids = rollout.completion_ids.tolist()
    out = []
    for row, rec in enumerate(records):
        toks = ids[row][: lengths[row]]
        text, ends = completion_token_ends(tokenizer, toks)
        out.append(sfr_reward(text, ends, rec, settings, n_tokens=len(toks)))
    return out
