"""The chat turn around a prompt, the token that ends an answer, and the tokens that stop generation.

Every path that turns text into model input (SFT examples, evaluation prompts, GRPO rollouts, extraction)
goes through :func:`chat_prompt_ids`, and every path that decodes stops on :func:`stop_token_ids`, so a model
is trained and run on one format:

* a tokenizer with a chat template renders ``[{"role": "user", "content": prompt}]`` with the generation
  prompt; the template itself is responsible for ``<bos>`` where the model wants one, and no special tokens
  are added on top (so there is exactly one ``<bos>``);
* a tokenizer without one falls back to ``"{prompt}\\nAnswer: "``, with the tokenizer's own ``bos`` in front
  when it has one;
* an answer ends with :func:`answer_end_id`: the chat template's turn-end marker (``<end_of_turn>``,
  ``<|im_end|>``), else (no template) the end-of-sequence token;
* a model may only be asked to write a token it can single out: :func:`adapt_chat_format` drops the chat
  template of a base model whose turn-end embedding row is untrained (a collapsed row, near-parallel to
  thousands of others, as in the Gemma 3 270M base: its ``<end_of_turn>`` row has cosine > 0.99 with 4,665
  rows).  With tied embeddings and LoRA on the linear layers such a token cannot be raised above its
  look-alikes, so answers never end; the plain format ends them with ``<eos>``, a row every base trained.
  :func:`check_answer_end` repeats the check on the loaded model, for tokenizers whose weights were not at hand;
* generation stops at any id in :func:`stop_token_ids`: the answer end, the end-of-sequence token, and
  whatever the model's generation config lists (Gemma: ``<eos>`` and ``<end_of_turn>``).
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch

TURN_END_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")
# a row is untrained when it is near-parallel (cosine above COLLAPSE_COSINE) to more than COLLAPSE_ROWS other rows
# of the embedding, or has (almost) no norm; trained rows of the shipped models have at most a handful of such
# neighbours (Gemma 3 270M: 0 for <eos>, <bos>, <start_of_turn>, '{"'; 4,665 for <end_of_turn>)
COLLAPSE_COSINE = 0.99
COLLAPSE_ROWS = 32

log = logging.getLogger(__name__)


def _token_id(tokenizer, token: str) -> Optional[int]:
    """The id of ``token`` if the vocabulary has it (a lookup, not ``get_vocab()``: that copies 262k entries)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or isinstance(tid, list) or tid < 0:
        return None
    return tid if tokenizer.convert_ids_to_tokens(tid) == token else None


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the user turn followed by the assistant header (generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(f"{prompt}\nAnswer: ", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + ids


def _template_text(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return ""
    return template if isinstance(template, str) else " ".join(str(v) for v in dict(template).values())


def turn_end_id(tokenizer) -> Optional[int]:
    """The turn-end marker the tokenizer's chat template writes (None without a template or marker)."""
    template = _template_text(tokenizer)
    for token in TURN_END_TOKENS:
        if token in template:
            tid = _token_id(tokenizer, token)
            if tid is not None:
                return tid
    return None


def answer_end_id(tokenizer) -> int:
    """The token that closes an answer: the chat template's turn-end marker, else (plain format) ``eos``."""
    tid = turn_end_id(tokenizer)
    return tid if tid is not None else tokenizer.eos_token_id


def lookalike_rows(embedding: torch.Tensor, token_id: int) -> int:
    """How many other rows of ``embedding`` are near-parallel to row ``token_id`` (cosine > COLLAPSE_COSINE); the
    whole vocabulary when the row has no norm.  One matrix-vector product, in chunks, in float32."""
    row = embedding[token_id].float()
    norm = row.norm()
    if norm <= 1e-8:
        return embedding.shape[0] - 1
    count, chunk = 0, max(1, 2 ** 24 // embedding.shape[1])  # 64 MB of float32 at a time
    for start in range(0, embedding.shape[0], chunk):
        block = embedding[start:start + chunk].float()
        cos = (block @ row) / (block.norm(dim=1) * norm).clamp_min(1e-12)
        count += int((cos > COLLAPSE_COSINE).sum())
    return count - 1  # the row itself


def untrained_token(embedding: torch.Tensor, token_id: int) -> Optional[str]:
    """Why row ``token_id`` looks untrained (a sentence for a message), or None when it is a row of its own."""
    n = lookalike_rows(embedding, token_id)
    if n > COLLAPSE_ROWS:
        return f"its embedding row is near-parallel (cosine > {COLLAPSE_COSINE}) to {n:,} other rows"
    return None


def adapt_chat_format(tokenizer, embedding: Optional[torch.Tensor], name: str = "the model") -> Optional[str]:
    """Drop the chat template when the model cannot write its turn-end marker; returns the reason, or None.

    ``embedding`` is the model's input embedding (rows = token ids); None (weights not at hand) changes nothing."""
    end = turn_end_id(tokenizer)
    if embedding is None or end is None or end >= embedding.shape[0]:
        return None
    why = untrained_token(embedding, end)
    if why is None:
        return None
    token = tokenizer.convert_ids_to_tokens(end)
    tokenizer.chat_template = None
    reason = (f"{name}: the chat template's turn end {token} (id {end}) is untrained: {why}; prompts use the plain "
              f"format and answers end with {tokenizer.eos_token} (id {tokenizer.eos_token_id})")
    log.info(reason)
    return reason


def check_answer_end(tokenizer, model) -> None:
    """Raise when ``model`` cannot write the token its answers end with (see :func:`adapt_chat_format`)."""
    get = getattr(model, "get_input_embeddings", None)
    layer = get() if get is not None else None
    weight = getattr(layer, "weight", None)
    if weight is None or weight.dim() != 2 or weight.shape[0] == 0:  # absent, or sharded away (DeepSpeed stage 3)
        return
    end = answer_end_id(tokenizer)
    why = untrained_token(weight.detach(), end) if end is not None and end < weight.shape[0] else None
    if why is not None:
        raise ValueError(f"answers end with {tokenizer.convert_ids_to_tokens(end)} (id {end}), which this model cannot "
                         f"write: {why}. Load the tokenizer through prouie_pl.modeling.load_tokenizer with the model's "
                         "weights on disk (it then uses the plain format, ending answers with eos), or remove the "
                         "tokenizer's chat_template")


def answer_ids(tokenizer, target: str) -> list[int]:
    """Token ids of an answer followed by its end token."""
    return tokenizer(target, add_special_tokens=False)["input_ids"] + [answer_end_id(tokenizer)]


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends generation, sorted: the answer end, ``eos`` and the generation config's ``eos_token_id``."""
    ids: set[int] = {answer_end_id(tokenizer)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    extra = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if extra is not None:
        ids.update([extra] if isinstance(extra, int) else list(extra))
    return sorted(ids)


def first_stop(ids: Iterable[int], stops: Iterable[int]) -> Optional[int]:
    """Index of the first stop id in ``ids`` (None when there is none)."""
    stop_set = set(stops)
    for i, t in enumerate(ids):
        if t in stop_set:
            return i
    return None
