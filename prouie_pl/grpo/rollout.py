"""Rollouts: G sampled completions for each of the P prompts of a batch.

:func:`generate_rollouts` is the one place a GRPO step gets its completions from, so a faster engine (vLLM on a
GPU) plugs in here and nowhere else.  Today it is :func:`prouie_pl.decoding.decode_prompts`, the path
evaluation and extraction decode through too: with ``prefill: shared`` (the default) each prompt is prefilled
once and its KV cache repeated G times before sampling; ``prefill: repeated`` repeats the prompts G times
before ``generate`` (each prefilled G times), which samples from the same distribution and is kept to measure
the difference (``bench/grpo_step.py``).  With ``engine: loop`` (the default) the completions are decoded by
:func:`prouie_pl.decoding.decode_loop`, which drops each completion from the batch (and its KV cache) once it
has stopped; ``engine: generate`` decodes with ``model.generate``, every completion until the last one stops
(the same distribution; ``bench/decode_engines.py`` compares the two).

Consecutive rows form a group (the G completions of one prompt).  Sampling uses the given temperature and
top-p and stops at any stop token (:func:`prouie_pl.chat.stop_token_ids`).  A completion's mask covers its
tokens up to and including the first stop token; a completion that hit the length limit without one is
flagged ``truncated``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..decoding import ENGINES, Sampling, completion_mask, decode_prompts, prompt_rows

PREFILL_MODES = ("shared", "repeated")

__all__ = ["ENGINES", "PREFILL_MODES", "Rollout", "RolloutSettings", "completion_mask", "generate_rollouts"]


@dataclass
class RolloutSettings:
    """Sampling for GRPO rollouts.

    Args:
        num_generations: completions per prompt (G, the group size); at least 2.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        max_new_tokens: cap on completion length; completions cut there are flagged truncated.
        prefill: ``shared``: each prompt is prefilled once and its KV cache repeated for its G completions;
            ``repeated``: the prompt is repeated G times and prefilled G times (same distribution, slower).
        engine: ``loop``: the decoding loop of :mod:`prouie_pl.decoding`, completions leaving the batch as they
            stop; ``generate``: ``model.generate``, every completion decoded until the last one stops (same
            distribution, slower when completion lengths differ).
    """

    num_generations: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    prefill: Literal["shared", "repeated"] = "shared"
    engine: Literal["loop", "generate"] = "loop"

    def __post_init__(self) -> None:
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"model.rollout.prefill must be one of {', '.join(PREFILL_MODES)}, not {self.prefill!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"model.rollout.engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [N, P] left-padded, N = prompts x G
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, L] right-padded
    completion_mask: torch.Tensor  # [N, L] 1 up to and including the end token
    truncated: torch.Tensor  # [N] bool

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)


def generate_rollouts(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings: RolloutSettings) -> Rollout:
    """G sampled completions of every prompt of a left-padded batch (rows ``i * G`` to ``i * G + G - 1``)."""
    from ..chat import stop_token_ids

    g = settings.num_generations
    done = decode_prompts(
        model, prompt_rows(input_ids, attention_mask), num_samples=g, batch_size=None,
        max_new_tokens=settings.max_new_tokens, stop_ids=stop_token_ids(tokenizer, getattr(model, "generation_config", None)),
        pad_id=tokenizer.pad_token_id, sampling=Sampling(settings.temperature, settings.top_p),
        share_prefix=settings.prefill == "shared", device=input_ids.device, engine=settings.engine,
    )
    return Rollout(input_ids.repeat_interleave(g, dim=0), attention_mask.repeat_interleave(g, dim=0), done.ids, done.mask,
                   done.truncated)
