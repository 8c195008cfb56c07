"""Prompts computed once in training: a shared prefix runs through the decoder once, with gradients, and every
row that starts with it attends to its keys and values.

Two places repeat a prompt in training:

* a GRPO step scores G completions of each prompt (the policy pass with gradients, the reference and old-policy
  passes without): :func:`grouped_completion_logprobs` prefills each distinct prompt once and selects its KV
  cache for every completion of it;
* an SFT batch drawn from one data set and output format repeats the prompt head (template, task line, label
  list, answer instruction) in every row: :func:`answer_nll_shared_head` runs the longest head all rows share
  once and the rest of each row on top of it.

How: the decoder runs over the prefix with ``use_cache=True`` and gradients on; the cache it returns
(``DynamicCache``; Gemma 3's sliding-window layers keep the last ``window - 1`` positions, all a later query can
see) is indexed along the batch, an autograd operation whose backward sums the rows' gradients into the one
prefix computation; the decoder then runs the rest of every row with that cache, the full attention mask
(prefix and rest) and the positions the whole sequence would have had.  The result is the per-row computation
up to float rounding: the same loss and the same gradients, in less time and memory.  Dropout is the one
difference: a shared prefix draws one dropout mask for all the rows it serves (LoRA dropout is 0 in the shipped
configs).

Both functions return exactly what their per-row counterparts (:func:`prouie_pl.grpo.logprobs.completion_logprobs`,
:func:`prouie_pl.sft.answer_nll`) return, so a switch picks either path.

Gradient checkpointing (``base.gradient_checkpointing``, the QLoRA configs) and a shared prefix exclude each other:
transformers drops the KV cache inside checkpointed layers, since replaying a layer in the backward pass would
write its keys and values to the cache a second time.  With gradients on and checkpointing active, both functions
run the per-row path (checkpointing keeps its memory saving; the prompt is computed once per row) and say so
once; without gradients (reference and old-policy passes) nothing is checkpointed and the prefix is shared.
"""

from __future__ import annotations

from typing import Optional

import torch

from .decoding import _cache_keyword, drop_padding_columns, output_cache
from .kernels import linear_token_logprobs
from .kernels.reference import IGNORE_INDEX
from .modeling import checkpointing_active, decoder_and_head

# a shared SFT head shorter than this is not worth a second decoder call
MIN_SHARED_HEAD = 8
_told_checkpointing = False


def _per_row_under_checkpointing(model) -> bool:
    """True (and a note, once per process) where gradient checkpointing rules the shared prefix out."""
    global _told_checkpointing
    if not checkpointing_active(model):
        return False
    if not _told_checkpointing:
        _told_checkpointing = True
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info("[prouie] gradient checkpointing is on: passes with gradients compute each row's prompt "
                       "itself (a shared prefix needs the KV cache that checkpointed layers drop)")
    return True


def prefix_cache(decoder, ids: torch.Tensor, mask: Optional[torch.Tensor], position_ids: torch.Tensor, rows: torch.Tensor):
    """KV cache of ``ids`` (one row per distinct prefix), computed with whatever grad mode is on, then indexed
    along the batch by ``rows`` (row ``i`` of the result is prefix ``rows[i]``)."""
    cache = output_cache(decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True))
    if cache is None:
        raise RuntimeError(f"{type(decoder).__name__} returned no KV cache with use_cache=True; use the per-row path")
    cache.batch_select_indices(rows)
    return cache


def grouped_completion_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, owner: torch.Tensor,
                                completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                                temperature: float = 1.0) -> torch.Tensor:
    """[N, L] fp32 log-probabilities of the completion tokens (0 where the mask is 0), each of the U distinct
    left-padded prompts ``prompt_ids`` [U, P] run once; ``owner`` [N] gives the prompt of each completion.

    Equal to :func:`prouie_pl.grpo.logprobs.completion_logprobs` on the prompts repeated by ``owner``: every
    prompt token but the last goes through the decoder once per prompt, the last one and the completion once
    per completion (the last prompt token's hidden state predicts the first completion token)."""
    prompt_ids, prompt_mask = drop_padding_columns(prompt_ids, prompt_mask)
    p = prompt_ids.shape[1]
    if p < 2 or _per_row_under_checkpointing(model):  # nothing to share, or no cache to share it through
        from .grpo.logprobs import completion_logprobs

        return completion_logprobs(model, prompt_ids[owner], prompt_mask[owner], completion_ids, completion_mask, temperature)
    decoder, head = decoder_and_head(model)
    full_mask = torch.cat([prompt_mask[owner], completion_mask], dim=1)
    # positions as generation saw them: left padding does not advance the position
    positions = (full_mask.cumsum(dim=1) - 1).clamp(min=0)
    head_mask = prompt_mask[:, :-1]
    cache = prefix_cache(decoder, prompt_ids[:, :-1], head_mask, (head_mask.cumsum(dim=1) - 1).clamp(min=0), owner)
    # inputs whose hidden states predict the completion: the last prompt token and every completion token but the last
    rest = torch.cat([prompt_ids[owner, -1:], completion_ids[:, :-1]], dim=1)
    width = p - 1 + rest.shape[1]
    hidden = decoder(input_ids=rest, attention_mask=full_mask[:, :width], position_ids=positions[:, p - 1:width],
                     use_cache=True, **{_cache_keyword(decoder): cache}).last_hidden_state
    targets = completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    return linear_token_logprobs(hidden, head.weight, targets, bias=head.bias, temperature=temperature)


def group_owners(rows: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first row of each distinct group among rows, the group of each row as an index into those)`` for
    completions in consecutive groups of ``group_size``."""
    groups = torch.div(rows, group_size, rounding_mode="floor")
    distinct, owner = torch.unique(groups, sorted=True, return_inverse=True)
    return distinct * group_size, owner


def shared_head_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> int:
    """Length of the longest token prefix every row of a right-padded SFT batch shares, kept short of the first
    position whose hidden state predicts an answer token (so the head's own outputs are never needed)."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0) & attention_mask.bool().all(dim=0)
    differs = (~same).nonzero()
    common = int(differs[0]) if len(differs) else input_ids.shape[1]
    answer = (labels != IGNORE_INDEX)
    if bool(answer.any()):
        first_target = int(answer.int().argmax(dim=1)[answer.any(dim=1)].min())
        common = min(common, first_target - 1)
    return max(common, 0)


def answer_nll_shared_head(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                           min_head: int = MIN_SHARED_HEAD) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the answer tokens and their count, as :func:`prouie_pl.sft.answer_nll`,
    with the head the rows share (:func:`shared_head_length`) computed once; a head shorter than ``min_head``
    runs the per-row path."""
    from .sft import answer_nll

    h = shared_head_length(input_ids, attention_mask, labels)
    if h < max(min_head, 1) or _per_row_under_checkpointing(model):
        return answer_nll(model, input_ids, attention_mask, labels)
    decoder, head = decoder_and_head(model)
    n, width = input_ids.shape
    one = torch.zeros(n, dtype=torch.long, device=input_ids.device)
    cache = prefix_cache(decoder, input_ids[:1, :h], None, torch.arange(h, device=input_ids.device).unsqueeze(0), one)
    positions = torch.arange(h, width, device=input_ids.device).unsqueeze(0).expand(n, -1)
    hidden = decoder(input_ids=input_ids[:, h:], attention_mask=attention_mask, position_ids=positions, use_cache=True,
                     **{_cache_keyword(decoder): cache}).last_hidden_state
    # hidden[:, t] is position h + t and predicts token h + t + 1
    targets = labels[:, h + 1:]
    keep = targets != IGNORE_INDEX
    lp = linear_token_logprobs(hidden[:, :-1][keep], head.weight, targets[keep], bias=head.bias)
    return -lp.sum(), int(keep.sum())
