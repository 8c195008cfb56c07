"""The chat turn around a prompt, the token that ends an answer, and the tokens that stop generation.

Every path that turns text into model input (SFT examples, evaluation prompts, GRPO rollouts, extraction)
goes through :func:`chat_prompt_ids`, and every path that decodes stops on :func:`stop_token_ids`, so a model
is trained and run on one format:

* a tokenizer with a chat template renders ``[{"role": "user", "content": prompt}]`` with the generation
  prompt; the template itself is responsible for ``<bos>`` where the model wants one, and no special tokens
  are added on top (so there is exactly one ``<bos>``);
* a tokenizer without one falls back to ``"{prompt}\\nAnswer: "``, with the tokenizer's own ``bos`` in front
  when it has one;
* an answer ends with :func:`answer_end_id`: the turn-end marker when the tokenizer has one
  (``<end_of_turn>``, ``<|im_end|>``), else the end-of-sequence token;
* generation stops at any id in :func:`stop_token_ids`: the answer end, the end-of-sequence token, and
  whatever the model's generation config lists (Gemma: ``<eos>`` and ``<end_of_turn>``).
"""

from __future__ import annotations

from typing import Iterable, Optional

TURN_END_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")


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


def answer_end_id(tokenizer) -> int:
    """The token that closes an answer: the chat turn's end marker if the vocabulary has one, else ``eos``."""
    for token in TURN_END_TOKENS:
        tid = _token_id(tokenizer, token)
        if tid is not None:
            return tid
    return tokenizer.eos_token_id


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
