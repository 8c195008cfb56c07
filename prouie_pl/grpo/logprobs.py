"""Per-token log-probabilities of completions under the policy (or the reference: the same model with its
LoRA adapter disabled).  The decoder runs over prompt + completion; the LM head is applied only at the
positions that predict completion tokens, through :func:`prouie_pl.kernels.linear_token_logprobs`, so the
full logits are never built."""

from __future__ import annotations

import torch

from ..kernels import linear_token_logprobs
from ..kernels.reference import IGNORE_INDEX
from ..modeling import decoder_and_head


def completion_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[N, L] fp32 log-probabilities of the completion tokens (0 where the mask is 0)."""
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    # positions as generation saw them: left padding does not advance the position
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).last_hidden_state
    p = prompt_ids.shape[1]
    h = hidden[:, p - 1:-1]
    targets = completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    return linear_token_logprobs(h, head.weight, targets, bias=head.bias, temperature=temperature)
