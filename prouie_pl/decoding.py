"""Decoding prompts into completions: the one path behind GRPO rollouts, evaluation and extraction.

:func:`decode_prompts` (and its streaming form :func:`iter_decode`) takes prompts as token-id lists and

1. batches them by prompt length (longest first, at most ``batch_size`` prompts a batch) so a batch pads
   little, and left-pads each batch (generation appends on the right);
2. decodes a batch with :func:`decode_batch`: greedy, or sampling with temperature and top-p; with
   ``num_samples = G > 1`` each prompt is prefilled once, its KV cache repeated G times, and the G
   completions sampled from there (``share_prefix``; otherwise the prompt is repeated G times and prefilled
   G times, as a plain ``generate`` would);
3. stops every row at any id of ``stop_ids`` (:func:`prouie_pl.chat.stop_token_ids`: Gemma ends a turn with
   ``<end_of_turn>`` and ``<eos>`` also ends generation) and returns :class:`Completions`: ids right-padded
   after the first stop, a mask up to and including it, and which rows hit the length limit without one.

Results come back in prompt order, the G completions of prompt ``i`` in rows ``i * G`` to ``i * G + G - 1``.

:func:`generate_greedy` is the evaluation entry (validation, test, predict, ``extract``), optionally under the
schema-constrained processor of :mod:`prouie_pl.constrained`; :func:`prouie_pl.grpo.rollout.generate_rollouts`
is the sampling entry.

Shared prefixes: the decoder runs over every prompt token but the last with ``use_cache=True``; the cache
(``DynamicCache``; for Gemma 3 its sliding-window layers are ``DynamicSlidingWindowLayer``, which keep the last
``sliding_window - 1`` positions) is repeated along the batch with ``Cache.batch_repeat_interleave`` and handed
to ``generate`` together with the repeated prompts, so ``generate`` itself runs only the last prompt token of
each row before sampling.  Sampling is ``generate``'s own (its temperature and top-p processors, ``top_k``
off), so both ways sample from the same distribution.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from .schema import LabelSchema


@dataclass(frozen=True)
class Sampling:
    """Sampling instead of greedy decoding: ``temperature`` and nucleus mass ``top_p`` (top-k is off)."""

    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Completions:
    """Decoded completions, one row per (prompt, sample)."""

    ids: torch.Tensor  # [N, L] right-padded with the pad id after the first stop
    mask: torch.Tensor  # [N, L] 1 up to and including the first stop
    truncated: torch.Tensor  # [N] bool: the length limit came before any stop id

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens per row, its stop token included."""
        return self.mask.sum(dim=1)

    def texts(self, tokenizer) -> list[str]:
        """Each row decoded as generated: no clean-up of spaces, which would change spans copied from the text."""
        rows = self.ids.tolist()
        return tokenizer.batch_decode([r[:n] for r, n in zip(rows, self.lengths.tolist())], skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)


# a factory of the logits processor for one batch: (indices of its prompts, its padded prompt width) -> processor
ProcessorFactory = Callable[[list[int], int], object]


def completion_mask(completion_ids: torch.Tensor, stop_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask up to and including the first stop token (any of ``stop_ids``), and whether each row never produced one."""
    stops = torch.as_tensor([stop_ids] if isinstance(stop_ids, int) else list(stop_ids), device=completion_ids.device)
    is_stop = torch.isin(completion_ids, stops)
    has_stop = is_stop.any(dim=1)
    first = torch.where(has_stop, is_stop.int().argmax(dim=1), torch.full_like(has_stop, completion_ids.shape[1], dtype=torch.long))
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device).unsqueeze(0)
    mask = (positions <= first.unsqueeze(1)).long()
    return mask, ~has_stop


def prompt_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """The prompts of a padded batch as token-id lists (padding dropped)."""
    keep = attention_mask.bool()
    return [row[m].tolist() for row, m in zip(input_ids, keep)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of prompts left-padded to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def length_batches(lengths: Sequence[int], batch_size: Optional[int]) -> list[list[int]]:
    """Indices in batches of at most ``batch_size`` (None: one batch, in the given order), longest prompts first
    (ties keep their order), so each batch pads little."""
    if batch_size is None or batch_size >= len(lengths):
        return [list(range(len(lengths)))] if len(lengths) else []
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, not {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


@contextmanager
def eval_mode(model):
    """Dropout off while decoding; the model's train/eval state is put back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _decoder(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder()


def _cache_keyword(decoder) -> str:
    """What this transformers version calls the KV cache argument (``cache`` from 5.x, ``past_key_values`` before)."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefill_shared_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeats: int) -> tuple[str, object]:
    """KV cache of a left-padded batch (every column but the last), each row repeated ``repeats`` times.

    Returns ``(keyword, cache)``: pass ``{keyword: cache}`` to ``generate`` with the repeated prompts, and it
    runs only their last token before sampling.  Positions are those ``generate`` gives a left-padded row
    (padding does not advance them), so the cached keys are the ones it would have computed itself.
    """
    decoder = _decoder(model)
    keyword = _cache_keyword(decoder)
    ids, mask = input_ids[:, :-1], attention_mask[:, :-1]
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise RuntimeError(f"{type(decoder).__name__} returned no KV cache with use_cache=True; decode with share_prefix=False")
    cache.batch_repeat_interleave(repeats)
    return keyword, cache


@torch.no_grad()
def decode_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int, stop_ids: Sequence[int],
                 pad_id: int, sampling: Optional[Sampling] = None, num_samples: int = 1, share_prefix: bool = True,
                 logits_processor=None) -> Completions:
    """Completions of one left-padded batch: ``num_samples`` per prompt (rows ``i * G + j``), greedy when
    ``sampling`` is None.  ``logits_processor`` (a transformers processor list) sees the rows as ``generate``
    does, prompts repeated."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, not {num_samples}")
    # columns that are padding in every row (a batch cut from a wider one) cost compute and change nothing
    used = attention_mask.bool().any(dim=0)
    if not bool(used.all()):
        first = int(used.int().argmax())
        input_ids, attention_mask = input_ids[:, first:], attention_mask[:, first:]
    stops = list(stop_ids)
    kwargs: dict = {}
    if sampling is None:
        kwargs.update(do_sample=False)
    else:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    if logits_processor is not None:
        kwargs["logits_processor"] = logits_processor
    with eval_mode(model):
        if num_samples > 1 and share_prefix and input_ids.shape[1] > 1:
            keyword, cache = prefill_shared_cache(model, input_ids, attention_mask, num_samples)
            kwargs[keyword] = cache
        ids = input_ids.repeat_interleave(num_samples, dim=0) if num_samples > 1 else input_ids
        mask = attention_mask.repeat_interleave(num_samples, dim=0) if num_samples > 1 else attention_mask
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             eos_token_id=stops, use_cache=True, **kwargs)
    new = out[:, ids.shape[1]:]
    if new.shape[1] == 0:  # nothing generated at all: an empty answer that ends at once
        new = torch.full((ids.shape[0], 1), stops[0], dtype=ids.dtype, device=ids.device)
    cmask, truncated = completion_mask(new, stops)
    return Completions(new.masked_fill(cmask == 0, pad_id), cmask, truncated)


def iter_decode(model, prompts: Sequence[Sequence[int]], *, batch_size: Optional[int], max_new_tokens: int,
                stop_ids: Sequence[int], pad_id: int, sampling: Optional[Sampling] = None, num_samples: int = 1,
                share_prefix: bool = True, processor_for: Optional[ProcessorFactory] = None,
                device=None) -> Iterator[tuple[list[int], Completions]]:
    """``(prompt indices, their completions)`` batch by batch, batches formed by :func:`length_batches`."""
    if device is None:
        device = _model_device(model)
    for idx in length_batches([len(p) for p in prompts], batch_size):
        ids, mask = left_pad([prompts[i] for i in idx], pad_id, device)
        processor = None
        if processor_for is not None:
            from transformers import LogitsProcessorList

            processor = LogitsProcessorList([processor_for(idx, ids.shape[1])])
        yield idx, decode_batch(model, ids, mask, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                                sampling=sampling, num_samples=num_samples, share_prefix=share_prefix,
                                logits_processor=processor)


def decode_prompts(model, prompts: Sequence[Sequence[int]], *, num_samples: int = 1, **options) -> Completions:
    """Completions of every prompt, in prompt order (``num_samples`` consecutive rows per prompt); ``options``
    as for :func:`iter_decode`."""
    parts = list(iter_decode(model, prompts, num_samples=num_samples, **options))
    if len(parts) == 1 and parts[0][0] == list(range(len(prompts))):
        return parts[0][1]
    pad_id = options["pad_id"]
    width = max(c.ids.shape[1] for _, c in parts)
    n = len(prompts) * num_samples
    device = parts[0][1].ids.device
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    truncated = torch.zeros(n, dtype=torch.bool, device=device)
    for idx, c in parts:
        rows = (torch.as_tensor(idx, device=device).unsqueeze(1) * num_samples + torch.arange(num_samples, device=device)).flatten()
        ids[rows, :c.ids.shape[1]] = c.ids
        mask[rows, :c.mask.shape[1]] = c.mask
        truncated[rows] = c.truncated
    return Completions(ids, mask, truncated)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@dataclass
class GreedyOutput:
    """Answers of one batch: decoded text, whether the length limit cut it, and tokens generated (stop included)."""

    texts: list[str]
    truncated: list[bool]
    new_tokens: list[int]


def greedy_output(tokenizer, completions: Completions) -> GreedyOutput:
    return GreedyOutput(completions.texts(tokenizer), [bool(t) for t in completions.truncated.tolist()],
                        [int(n) for n in completions.lengths.tolist()])


def constraint_factory(tokenizer, rows: Sequence[tuple[str, LabelSchema, str]], max_new_tokens: int,
                       stop_ids: Sequence[int]) -> ProcessorFactory:
    """The schema-constrained processor (:mod:`prouie_pl.constrained`) for the prompts of each batch; ``rows``
    gives ``(task, schema, text)`` per prompt."""
    from .constrained import SchemaConstrainedLogits

    def build(idx: list[int], prompt_width: int):
        return SchemaConstrainedLogits(tokenizer, [rows[i] for i in idx], prompt_width, max_new_tokens, stop_ids)

    return build


def generate_greedy(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    stop_ids: Sequence[int],
                    constraint_rows: Optional[Sequence[tuple[str, LabelSchema, str]]] = None) -> GreedyOutput:
    """Greedy answers for a left-padded batch (decoded as one batch); ``constraint_rows`` gives
    ``(task, schema, text)`` per row to decode under the concise-format constraint."""
    if constraint_rows is not None and len(constraint_rows) != input_ids.shape[0]:
        raise ValueError(f"constrained decoding needs one (task, schema, text) per row: {len(constraint_rows)} for {input_ids.shape[0]} rows")
    factory = None if constraint_rows is None else constraint_factory(tokenizer, constraint_rows, max_new_tokens, stop_ids)
    completions = decode_prompts(model, prompt_rows(input_ids, attention_mask), batch_size=None, max_new_tokens=max_new_tokens,
                                 stop_ids=stop_ids, pad_id=tokenizer.pad_token_id, processor_for=factory, device=input_ids.device)
    return greedy_output(tokenizer, completions)
