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

Engines (``engine``): ``loop`` (the default) is this module's own decoding loop, :func:`decode_loop`.  It
prefills as above (the shared cache and the last prompt token of each row, or the repeated prompts whole),
then feeds one token a step with ``use_cache=True``, the attention mask and position ids kept as ``generate``
keeps them for left-padded rows (position = cumsum(mask) - 1, one more each step; a mask of all ones is not
passed at all), and asks the model for the logits of the last position only (``logits_to_keep=1``).  When rows
stop, they leave the batch: the cache keeps only the live rows (``Cache.batch_select_indices``; a
``DynamicSlidingWindowLayer`` selects along the batch like a full layer and keeps its one shared position
count), and so do the input, mask and position tensors; each finished row's tokens stay in its own row of the
output.  Rows that stopped early thus cost no more forward passes (nor the LM head, 262,144 wide for
Gemma 3), where ``generate`` runs every row until the slowest one stops.  Greedy tokens are ``generate``'s
(argmax of the float32 logits; a smaller batch can change a logit in its last bits, which matters only where
two logits are all but tied, as between any two batch sizes in ``generate``); sampling applies ``generate``'s temperature and
top-p warpers (top-k off) and draws from the softmax by inverting its cumulative sum (:func:`draw_tokens`, the
distribution ``torch.multinomial`` samples at a quarter of its time over a 262k vocabulary), the same distribution, though
not the same draws once a row has left.  ``generate`` is ``model.generate`` as before; it is also what runs
under a ``logits_processor`` whatever the engine (the schema-constrained processor keeps per-row state by
batch row and reads the full ``input_ids``, so those batches never drop rows).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Optional, Sequence

import torch

from .schema import LabelSchema

ENGINES = ("loop", "generate")
Engine = Literal["loop", "generate"]


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
    # [N, L] float32: log-probability of each emitted token under the distribution it was chosen from (the
    # model's softmax; after the temperature / top-p warpers when sampling, after the logits processor under a
    # constraint), 0 after the first stop
    logprobs: Optional[torch.Tensor] = None
    # [N] bool: the loop guard ended the row (:class:`LoopGuard`; such rows are ``truncated`` too), None without one
    looped: Optional[torch.Tensor] = None

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens per row, its stop token included."""
        return self.mask.sum(dim=1)

    def texts(self, tokenizer) -> list[str]:
        """Each row decoded as generated: no clean-up of spaces, which would change spans copied from the text."""
        rows = self.ids.tolist()
        return tokenizer.batch_decode([r[:n] for r, n in zip(rows, self.lengths.tolist())], skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)


@dataclass(frozen=True)
class LoopGuard:
    """Ends an answer caught in a loop: its last tokens are one block of at most ``max_period`` tokens written
    ``repeats`` times in a row, over at least ``min_span`` tokens (a block of one token must thus come 32 times
    with the defaults, a block of 12 three times).  The answer keeps the first two copies of the block and drops
    the rest: where the block starts is arbitrary, so one copy may end inside a unit, but two in a row hold every
    unit of the block whole.  It counts as cut (``truncated``) like an answer that reaches ``max_new_tokens``: it
    never ended on its own.  A small model's greedy answer that starts repeating a unit repeats it to the cap; the
    guard saves those tokens and most of the repeats."""

    repeats: int = 3
    max_period: int = 64
    min_span: int = 32

    def __post_init__(self):
        if self.repeats < 2 or self.max_period < 1 or self.min_span < 1:
            raise ValueError(f"LoopGuard needs repeats >= 2, max_period >= 1 and min_span >= 1, not {self}")

    def windows(self) -> list[tuple[int, int]]:
        """``(period, span)`` pairs, shortest period first: a loop of that period shows over that many last tokens."""
        return [(p, p * max(self.repeats, -(-self.min_span // p))) for p in range(1, self.max_period + 1)]

    def repeated_tail(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N]`` long: how many of each row's last tokens to drop, under the shortest period that shows a loop
        (all but two copies of its block; 0 where no period shows one).  ``tokens`` is ``[N, T]``, the rows'
        tokens so far."""
        n, t = tokens.shape
        drop = torch.zeros(n, dtype=torch.long, device=tokens.device)
        for p, span in self.windows():
            if span > t:
                continue
            tail = tokens[:, t - span:]
            hit = (tail[:, p:] == tail[:, :-p]).all(dim=1) & (drop == 0)
            drop = torch.where(hit, torch.full_like(drop, span - 2 * p), drop)
        return drop

    def first_loop(self, tokens: Sequence[int]) -> Optional[tuple[int, int]]:
        """Where decoding ``tokens`` one by one under the guard would end the answer: ``(step, kept)``, the number of
        tokens written when the loop shows and the number the answer keeps; None when it never shows."""
        best: Optional[tuple[int, int]] = None
        n = len(tokens)
        for p, span in self.windows():
            need, run = span - p, 0
            for i in range(n - p):  # tokens[i + p] == tokens[i] over ``need`` positions in a row ends a window
                run = run + 1 if tokens[i + p] == tokens[i] else 0
                if run >= need:
                    step = i + p + 1
                    if best is None or step < best[0]:
                        best = (step, step - need + p)
                    break
        return best


class LoopStop:
    """One batch's :class:`LoopGuard`: which rows it ended and how many tokens each keeps (``keep``, -1 for rows
    it did not end).  :func:`decode_loop` calls :meth:`update` every step; under ``generate`` the object is a
    stopping criterion (``prompt_width`` columns of ``input_ids`` are the prompt)."""

    def __init__(self, guard: LoopGuard, rows: int, stop_ids: Sequence[int], prompt_width: int = 0):
        self.guard, self.prompt_width = guard, prompt_width
        self.stop_ids = list(stop_ids)
        self.keep = torch.full((rows,), -1, dtype=torch.long)

    def update(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows (output row numbers ``rows``, tokens so far ``tokens``) that are looping now: ``[len(rows)]`` bool."""
        drop = self.guard.repeated_tail(tokens)
        hit = drop > 0
        if bool(hit.any()):
            self.keep[rows[hit].cpu()] = (tokens.shape[1] - drop[hit]).cpu()
        return hit

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_width:]
        stops = torch.as_tensor(self.stop_ids, device=new.device)
        live = (~torch.isin(new, stops).any(dim=1) & (self.keep.to(new.device) < 0)).nonzero().squeeze(1)
        hit = torch.zeros(new.shape[0], dtype=torch.bool, device=new.device)
        if live.numel():
            hit[live] = self.update(new[live], live)
        return hit

    def apply(self, mask: torch.Tensor, truncated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The completion mask cut after each ended row's kept tokens, ``truncated`` with those rows set, and
        which rows the guard ended."""
        keep = self.keep.to(mask.device)
        looped = keep >= 0
        cols = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
        mask = mask.masked_fill(looped.unsqueeze(1) & (cols >= keep.unsqueeze(1)), 0)
        return mask, truncated | looped, looped


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


def drop_padding_columns(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch without the columns that are padding in every row (a batch cut from a wider one): they
    cost compute and change nothing."""
    used = mask.bool().any(dim=0)
    if bool(used.all()) or not bool(used.any()):
        return ids, mask
    first = int(used.int().argmax())
    return ids[:, first:], mask[:, first:]


def output_cache(outputs):
    """The KV cache a forward with ``use_cache=True`` returned (``cache`` from transformers 5.x, ``past_key_values``
    before), or None."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


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
    cache = output_cache(out)
    if cache is None:
        raise RuntimeError(f"{type(decoder).__name__} returned no KV cache with use_cache=True; decode with share_prefix=False")
    cache.batch_repeat_interleave(repeats)
    return keyword, cache


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"decoding engine must be one of {', '.join(ENGINES)}, not {engine!r}")


def _lm_call_options(model) -> tuple[str, bool]:
    """``(cache keyword, whether logits_to_keep is accepted)`` of the causal LM's own forward (through a PEFT
    wrapper, whose forward passes keyword arguments on to it)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _sampling_warpers(sampling: Sampling) -> list:
    """The processors ``generate`` builds for ``do_sample=True, temperature, top_p, top_k=0``, in its order."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = []
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers


def decode_loop(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int, stop_ids: Sequence[int],
                pad_id: int, sampling: Optional[Sampling] = None, num_samples: int = 1, share_prefix: bool = True,
                with_logprobs: bool = False, loop_stop: Optional[LoopStop] = None):
    """New tokens ``[N, T]`` of a left-padded batch (rows ``i * G + j``), decoded step by step with finished rows
    dropped from the batch and the KV cache (see the module docstring); ``T`` is the number of steps run (the
    longest completion), a row's tokens after its first stop are ``pad_id``.  A ``loop_stop`` ends rows that loop
(they leave the batch as stopped rows do; it records where their answers end).  With ``with_logprobs`` it returns
    ``(tokens, logprobs)``, ``logprobs[i, t]`` the float32 log-probability of token ``t`` of row ``i`` under the
    distribution it was chosen from (0 after the row stopped).  Call under ``torch.no_grad`` and in eval mode
    (:func:`decode_batch` does)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be greater than 0, but is {max_new_tokens}")
    keyword, keeps_logits = _lm_call_options(model)
    g = num_samples
    ids = input_ids.repeat_interleave(g, dim=0) if g > 1 else input_ids
    mask = attention_mask.repeat_interleave(g, dim=0) if g > 1 else attention_mask
    n, device = ids.shape[0], ids.device
    # as generate: positions from the mask (padding at 0), and no mask at all where nothing is padded
    positions = (mask.long().cumsum(dim=1) - 1).masked_fill(mask == 0, 0)
    pass_mask = not bool((mask == 1).all())
    warpers = _sampling_warpers(sampling) if sampling is not None else []
    stops = torch.as_tensor(list(stop_ids), dtype=ids.dtype, device=device)
    extra: dict = {"logits_to_keep": 1} if keeps_logits else {}
    if g > 1 and share_prefix and ids.shape[1] > 1:
        _, cache = prefill_shared_cache(model, input_ids, attention_mask, g)
        step_ids, step_pos = ids[:, -1:], positions[:, -1:]
    else:  # the whole prompts, G copies each
        cache, step_ids, step_pos = None, ids, positions
    out = torch.full((n, max_new_tokens), pad_id, dtype=ids.dtype, device=device)
    out_lp = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device) if with_logprobs else None
    live = torch.arange(n, device=device)  # the output row of each row still in the batch
    steps = 0
    while True:
        past = {keyword: cache} if cache is not None else {}
        outputs = model(input_ids=step_ids, attention_mask=mask if pass_mask else None, position_ids=step_pos, use_cache=True,
                        return_dict=True, **past, **extra)
        cache = output_cache(outputs)
        scores = outputs.logits[:, -1].to(dtype=torch.float32)
        del outputs
        if sampling is None:
            nxt = scores.argmax(dim=-1)
        else:
            for warper in warpers:
                scores = warper(None, scores)
            nxt = draw_tokens(torch.softmax(scores, dim=-1))
        out[live, steps] = nxt
        if out_lp is not None:
            out_lp[live, steps] = chosen_logprobs(scores, nxt)
        steps += 1
        going = ~torch.isin(nxt, stops)
        if loop_stop is not None and steps >= loop_stop.guard.min_span and bool(going.any()):
            looping = torch.zeros_like(going)
            looping[going] = loop_stop.update(out[live[going], :steps], live[going])
            going &= ~looping
        if steps == max_new_tokens:
            break
        n_going = int(going.sum())
        if n_going == 0:
            break
        if cache is None:
            raise RuntimeError(f"{type(model).__name__} returned no KV cache with use_cache=True; decode with engine='generate'")
        if n_going < live.shape[0]:  # rows stopped: only the others go on, in the cache too
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, nxt, step_pos = live[keep], nxt[keep], step_pos[keep]
            if pass_mask:
                mask = mask[keep]
        if pass_mask:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        step_ids, step_pos = nxt.unsqueeze(1), step_pos[:, -1:] + 1
    if out_lp is not None:
        return out[:, :steps], out_lp[:, :steps]
    return out[:, :steps]


def draw_tokens(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (``[N, V]``, rows summing to 1), drawn by inverting each row's cumulative
    distribution at a uniform draw: the distribution ``torch.multinomial`` samples, at a quarter of its time over
    Gemma's 262,144-token vocabulary on a CPU (``multinomial`` draws an exponential variate per vocabulary entry;
    this is one running sum and one binary search).  The sum runs in float64, so no token's share is bent by
    rounding; a token of probability 0 is never drawn (its interval is empty)."""
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    u = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(probs.shape[-1] - 1).squeeze(1)


def chosen_logprobs(scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``log softmax(scores)[i, chosen[i]]`` per row, in float32, without materialising the log-softmax (one
    ``logsumexp`` pass over the vocabulary); rows whose scores are all ``-inf`` give ``-inf``."""
    scores = scores.to(torch.float32)
    return scores.gather(1, chosen.view(-1, 1)).squeeze(1) - torch.logsumexp(scores, dim=-1)


class ChosenLogProbs:
    """A logits processor that leaves the scores unchanged and records, for ``generate``, the log-probability
    of each token it goes on to pick under the scores it sees (put it last, after every processor that changes
    them).  At each call the token chosen at the step before is ``input_ids[:, -1]``; only that step's float32
    log-normaliser and scores are kept, so memory stays one ``[N, V]`` row set, not one per step.
    :meth:`finish` takes the last step's tokens."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []
        self._pending: Optional[torch.Tensor] = None

    def _take(self, chosen: torch.Tensor) -> None:
        if self._pending is not None:
            self.steps.append(chosen_logprobs(self._pending, chosen.to(self._pending.device)))
            self._pending = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self._pending = scores.detach().to(torch.float32).clone()
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """``[N, T]`` log-probabilities of ``new_tokens`` (the ``[N, T]`` tokens ``generate`` added)."""
        if new_tokens.shape[1]:
            self._take(new_tokens[:, -1])
        width = new_tokens.shape[1]
        if not self.steps:
            return torch.zeros(new_tokens.shape, dtype=torch.float32, device=new_tokens.device)
        lp = torch.stack(self.steps[:width], dim=1).to(new_tokens.device)
        if lp.shape[1] < width:
            lp = torch.cat([lp, lp.new_zeros((lp.shape[0], width - lp.shape[1]))], dim=1)
        return lp


@torch.no_grad()
def decode_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int, stop_ids: Sequence[int],
                 pad_id: int, sampling: Optional[Sampling] = None, num_samples: int = 1, share_prefix: bool = True,
                 logits_processor=None, engine: Engine = "loop", with_logprobs: bool = False,
                 loop_guard: Optional[LoopGuard] = None) -> Completions:
    """Completions of one left-padded batch: ``num_samples`` per prompt (rows ``i * G + j``), greedy when
    ``sampling`` is None.  ``with_logprobs`` fills :attr:`Completions.logprobs` (greedy decoding, or sampling
    with the ``loop`` engine, whose draws it records after the warpers; ``generate`` applies its sampling
    warpers after every given processor, so sampled ``generate`` batches carry none).

    ``engine``: ``loop`` decodes with :func:`decode_loop`, rows leaving the batch as they stop; ``generate`` with
    ``model.generate``, every row until the last one stops.  With a ``logits_processor`` (a transformers
    processor list, such as the schema-constrained one) the batch always goes through ``generate``, whatever
    ``engine`` says, and no row leaves it early: the processor sees the rows as ``generate`` gives them,
    prompts repeated, every row at every step.  ``loop_guard`` ends rows that loop (:class:`LoopGuard`) under
    either engine and fills :attr:`Completions.looped`."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, not {num_samples}")
    _check_engine(engine)
    input_ids, attention_mask = drop_padding_columns(input_ids, attention_mask)
    stops = list(stop_ids)
    rows = input_ids.shape[0] * num_samples
    stopper = LoopStop(loop_guard, rows, stops, input_ids.shape[1]) if loop_guard is not None else None
    if engine == "loop" and logits_processor is None:
        with eval_mode(model):
            new = decode_loop(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=pad_id,
                              sampling=sampling, num_samples=num_samples, share_prefix=share_prefix, with_logprobs=with_logprobs,
                              loop_stop=stopper)
        lp = None
        if with_logprobs:
            new, lp = new
    else:
        kwargs: dict = {}
        if sampling is None:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        recorder = ChosenLogProbs() if with_logprobs and sampling is None else None
        if recorder is not None:
            from transformers import LogitsProcessorList

            logits_processor = LogitsProcessorList([*(logits_processor or []), recorder])
        if logits_processor is not None:
            kwargs["logits_processor"] = logits_processor
        if stopper is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([stopper])
        with eval_mode(model):
            if num_samples > 1 and share_prefix and input_ids.shape[1] > 1:
                keyword, cache = prefill_shared_cache(model, input_ids, attention_mask, num_samples)
                kwargs[keyword] = cache
            ids = input_ids.repeat_interleave(num_samples, dim=0) if num_samples > 1 else input_ids
            mask = attention_mask.repeat_interleave(num_samples, dim=0) if num_samples > 1 else attention_mask
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=stops, use_cache=True, **kwargs)
        new = out[:, ids.shape[1]:]
        lp = recorder.finish(new) if recorder is not None else None
    if new.shape[1] == 0:  # nothing generated at all: an empty answer that ends at once
        new = torch.full((rows, 1), stops[0], dtype=input_ids.dtype, device=input_ids.device)
        lp = torch.zeros((rows, 1), dtype=torch.float32, device=input_ids.device) if lp is not None else None
    cmask, truncated = completion_mask(new, stops)
    looped = None
    if stopper is not None:
        cmask, truncated, looped = stopper.apply(cmask, truncated)
    if lp is not None:
        lp = lp.masked_fill(cmask == 0, 0.0)
    return Completions(new.masked_fill(cmask == 0, pad_id), cmask, truncated, lp, looped)


def iter_decode(model, prompts: Sequence[Sequence[int]], *, batch_size: Optional[int], max_new_tokens: int,
                stop_ids: Sequence[int], pad_id: int, sampling: Optional[Sampling] = None, num_samples: int = 1,
                share_prefix: bool = True, processor_for: Optional[ProcessorFactory] = None,
                device=None, engine: Engine = "loop", with_logprobs: bool = False,
                loop_guard: Optional[LoopGuard] = None) -> Iterator[tuple[list[int], Completions]]:
    """``(prompt indices, their completions)`` batch by batch, batches formed by :func:`length_batches`;
    ``engine`` as for :func:`decode_batch` (batches under ``processor_for`` decode through ``generate``)."""
    _check_engine(engine)
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
                                logits_processor=processor, engine=engine, with_logprobs=with_logprobs, loop_guard=loop_guard)


def decode_prompts(model, prompts: Sequence[Sequence[int]], *, num_samples: int = 1, **options) -> Completions:
    """Completions of every prompt, in prompt order (``num_samples`` consecutive rows per prompt); ``options``
    as for :func:`iter_decode` (``engine``: ``loop``, the default, or ``generate``)."""
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
    has_lp = all(c.logprobs is not None for _, c in parts)
    lp = torch.zeros((n, width), dtype=torch.float32, device=device) if has_lp else None
    has_looped = all(c.looped is not None for _, c in parts)
    looped = torch.zeros(n, dtype=torch.bool, device=device) if has_looped else None
    for idx, c in parts:
        rows = (torch.as_tensor(idx, device=device).unsqueeze(1) * num_samples + torch.arange(num_samples, device=device)).flatten()
        ids[rows, :c.ids.shape[1]] = c.ids
        mask[rows, :c.mask.shape[1]] = c.mask
        truncated[rows] = c.truncated
        if lp is not None:
            lp[rows, :c.logprobs.shape[1]] = c.logprobs
        if looped is not None:
            looped[rows] = c.looped
    return Completions(ids, mask, truncated, lp, looped)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@dataclass
class GreedyOutput:
    """Answers of one batch: decoded text, whether the length limit cut it, tokens generated (stop included),
    and, when asked for, each answer's token ids and their log-probabilities (stop included)."""

    texts: list[str]
    truncated: list[bool]
    new_tokens: list[int]
    token_ids: Optional[list[list[int]]] = None
    token_logprobs: Optional[list[list[float]]] = None
    looped: Optional[list[bool]] = None  # the loop guard ended the answer (it is ``truncated`` too)


def greedy_output(tokenizer, completions: Completions) -> GreedyOutput:
    lengths = [int(n) for n in completions.lengths.tolist()]
    ids = lps = None
    if completions.logprobs is not None:
        ids = [row[:n] for row, n in zip(completions.ids.tolist(), lengths)]
        lps = [row[:n] for row, n in zip(completions.logprobs.tolist(), lengths)]
    looped = [bool(x) for x in completions.looped.tolist()] if completions.looped is not None else None
    return GreedyOutput(completions.texts(tokenizer), [bool(t) for t in completions.truncated.tolist()], lengths, ids, lps, looped)


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
                    constraint_rows: Optional[Sequence[tuple[str, LabelSchema, str]]] = None,
                    engine: Engine = "loop", with_logprobs: bool = False, loop_guard: Optional[LoopGuard] = None) -> GreedyOutput:
    """Greedy answers for a left-padded batch (decoded as one batch); ``constraint_rows`` gives
    ``(task, schema, text)`` per row to decode under the concise-format constraint (through ``generate``,
    whatever ``engine`` says, see :func:`decode_batch`); ``loop_guard`` ends answers that loop."""
    if constraint_rows is not None and len(constraint_rows) != input_ids.shape[0]:
        raise ValueError(f"constrained decoding needs one (task, schema, text) per row: {len(constraint_rows)} for {input_ids.shape[0]} rows")
    factory = None if constraint_rows is None else constraint_factory(tokenizer, constraint_rows, max_new_tokens, stop_ids)
    completions = decode_prompts(model, prompt_rows(input_ids, attention_mask), batch_size=None, max_new_tokens=max_new_tokens,
                                 stop_ids=stop_ids, pad_id=tokenizer.pad_token_id, processor_for=factory, device=input_ids.device,
                                 engine=engine, with_logprobs=with_logprobs, loop_guard=loop_guard)
    return greedy_output(tokenizer, completions)
