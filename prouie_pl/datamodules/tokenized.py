"""Training examples tokenised once with ``Dataset.map`` and cached as Arrow.

:func:`encode_rows` turns the rows of one data set (:mod:`prouie_pl.sources`) into token ids for one
(tokenizer, target format, length cap, label shuffling): prompt through the chat template, answer plus its end
token, exactly as :func:`.batching.encode_sft` does for one example.  The result's fingerprint is derived from
the rows' fingerprint and those settings, so ``datasets`` finds the Arrow file of an earlier start and skips
tokenisation; the table is memory-mapped, and :class:`ArrowSFTDataset` reads a batch's rows from it when the
DataLoader asks, so the training set never sits in Python lists.
"""

from __future__ import annotations

import json
import random
from typing import Optional, Sequence

from torch.utils.data import Dataset

from ..chat import answer_end_id
from ..formats import example
from ..kernels.reference import IGNORE_INDEX
from ..reader import parse_record
from ..schema import LabelSchema
from .batching import Encoded, SFTItems

ENCODE_VERSION = "encode-2"  # part of the fingerprint: bump when what an example holds changes (2: answer-end rule)


def tokenizer_id(tokenizer) -> str:
    """A fingerprint of what the tokenizer does to text: its vocabulary and rules, chat template and special
    tokens (the same for the same files, whatever object loaded them)."""
    cached = getattr(tokenizer, "_prouie_fingerprint", None)  # kept on the object: an id() could be reused
    if cached is None:
        from datasets.fingerprint import Hasher

        backend = getattr(tokenizer, "backend_tokenizer", None)
        body = backend.to_str() if backend is not None else Hasher.hash(tokenizer)
        cached = Hasher.hash([body, getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id,
                              tokenizer.eos_token_id, tokenizer.pad_token_id, answer_end_id(tokenizer)])
        tokenizer._prouie_fingerprint = cached
    return cached


def encode_rows(rows, tokenizer, schema: LabelSchema, fmt: str, max_length: int, shuffle_seed: Optional[str] = None,
                num_proc: Optional[int] = None):
    """Token ids of every row: columns ``input_ids`` (prompt + answer, cut at ``max_length``), ``prompt_length``,
    ``length`` (of ``input_ids``), ``truncated`` (the answer was cut) and ``dropped`` (the prompt alone reaches ``max_length``: not trained).
    ``shuffle_seed`` shuffles each prompt's label order with a seed of its own (``shuffle_seed/uid``)."""
    from datasets import Features, List, Value

    from ..chat import chat_prompt_ids
    from ..sources import fingerprint

    end = answer_end_id(tokenizer)

    def encode(batch):
        ids, plen, length, cut, dropped = [], [], [], [], []
        for task, dataset, index, raw in zip(batch["task"], batch["dataset"], batch["index"], batch["record"]):
            rec = parse_record(json.loads(raw), task, dataset, schema, index, "train")
            rng = random.Random(f"{shuffle_seed}/{task}/{dataset}/{index}") if shuffle_seed is not None else None
            prompt, target = example(rec, fmt, shuffle_seed is not None, rng)
            p = chat_prompt_ids(tokenizer, prompt)
            a = tokenizer(target, add_special_tokens=False)["input_ids"] + [end]
            ids.append((p + a)[:max_length])
            plen.append(len(p))
            length.append(len(ids[-1]))
            cut.append(len(p) + len(a) > max_length)
            dropped.append(len(p) >= max_length)
        return {"input_ids": ids, "prompt_length": plen, "length": length, "truncated": cut, "dropped": dropped}

    features = Features({"input_ids": List(Value("int32")), "prompt_length": Value("int32"),
                         "length": Value("int32"), "truncated": Value("bool"), "dropped": Value("bool")})
    fp = fingerprint(ENCODE_VERSION, rows._fingerprint, tokenizer_id(tokenizer), fmt, max_length, shuffle_seed)
    return rows.map(encode, batched=True, batch_size=256, remove_columns=rows.column_names, features=features,
                    new_fingerprint=fp, num_proc=num_proc, desc=f"tokenising {fmt}")


class ArrowSFTDataset(Dataset):
    """SFT examples read from an encoded Arrow table (:func:`encode_rows`), restricted to ``indices``."""

    def __init__(self, table, indices: Sequence[int]):
        self.table = table
        self.indices = list(indices)
        whole = self.indices == list(range(len(table)))
        self._rows = table if whole else table.select(self.indices)
        self._lengths = list(self._rows["length"]) if len(self._rows) else []
        self._prompt = list(self._rows["prompt_length"]) if len(self._rows) else []

    def __len__(self) -> int:
        return len(self.indices)

    def _example(self, ids: list[int], plen: int, truncated: bool) -> Encoded:
        labels = [IGNORE_INDEX] * min(plen, len(ids)) + ids[plen:]
        return Encoded(ids, labels, truncated)

    def __getitem__(self, i: int) -> Encoded:
        row = self._rows[int(i)]
        return self._example(row["input_ids"], row["prompt_length"], row["truncated"])

    def __getitems__(self, indices) -> SFTItems:
        part = self._rows[[int(i) for i in indices]]  # one read of the batch's rows: a dict of columns
        items = SFTItems(self._example(ids, p, t) for ids, p, t in zip(part["input_ids"], part["prompt_length"], part["truncated"]))
        items.step_weight = getattr(indices, "step_weight", None)
        return items

    def lengths(self) -> list[int]:
        return list(self._lengths)

    def answer_tokens(self) -> list[int]:
        """Tokens each example's loss covers (the answer positions after the first)."""
        return [n - max(p, 1) for n, p in zip(self._lengths, self._prompt)]
