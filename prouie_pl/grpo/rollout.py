"""Rollouts: G sampled completions for each of P prompts in one batched ``generate`` call.

Prompts arrive left-padded; each is repeated G times (consecutive rows form a group), sampled with the given
temperature and top-p, and stopped at any stop token (:func:`prouie_pl.chat.stop_token_ids`).  A completion's mask covers its tokens up to and
including the first end token; a completion that hit the length limit without an end token is flagged
``truncated``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RolloutSettings:
    """Sampling for GRPO rollouts.

    Args:
        num_generations: completions per prompt (G, the group size); at least 2.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        max_new_tokens: cap on completion length; completions cut there are flagged truncated.
    """

    num_generations: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128


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


def completion_mask(completion_ids: torch.Tensor, stop_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask up to and including the first stop token (any of ``stop_ids``), and whether each row never produced one."""
    stops = torch.as_tensor([stop_ids] if isinstance(stop_ids, int) else list(stop_ids), device=completion_ids.device)
    is_eos = torch.isin(completion_ids, stops)
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, completion_ids.shape[1], dtype=torch.long))
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device).unsqueeze(0)
    mask = (positions <= first.unsqueeze(1)).long()
    return mask, ~has_eos


@torch.no_grad()
def generate_rollouts(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings: RolloutSettings) -> Rollout:
    from ..chat import stop_token_ids

    g = settings.num_generations
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    ids = input_ids.repeat_interleave(g, dim=0)
    mask = attention_mask.repeat_interleave(g, dim=0)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=0,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stops,
        use_cache=True,
    )
    if was_training:
        model.train()
    completion = out[:, ids.shape[1]:]
    if completion.shape[1] == 0:  # nothing generated at all
        completion = torch.full((ids.shape[0], 1), stops[0], dtype=ids.dtype, device=ids.device)
    cmask, truncated = completion_mask(completion, stops)
    completion = completion.masked_fill(cmask == 0, tokenizer.pad_token_id)
    return Rollout(ids, mask, completion, cmask, truncated)
