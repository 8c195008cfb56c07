"""Tokenisation, collation and batch sampling.

* :func:`encode_sft`: prompt through the tokenizer's chat template, answer plus end token; labels mask the
  prompt so the loss covers the answer and the end token only.  Over-long examples are cut at the end of the
  answer (and counted); an example whose prompt alone is too long is dropped (and counted).
* :class:`LengthGroupedBatchSampler`: batches of similar length (within shuffled mega-batches) to cut
  padding, sharded across ranks by itself (so it needs ``use_distributed_sampler=False``), reshuffled per epoch.
  Given per-example weights (answer tokens) and the gradient-accumulation factor, it tags every batch with the
  total weight of its optimizer step over all ranks (``step_weight``), so the SFT loss can be normalised by
  the answer tokens of the whole step rather than per micro-batch.
* :class:`ResumableDataLoader`: tells Lightning how many batches of the current epoch were consumed, so a run
  resumed from a mid-epoch checkpoint continues with the next batch instead of replaying the epoch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..chat import answer_ids, chat_prompt_ids
from ..decoding import left_pad
from ..kernels.reference import IGNORE_INDEX
from ..schema import Record


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_sft(tokenizer, prompt: str, target: str, max_length: int) -> Optional[Encoded]:
    p = chat_prompt_ids(tokenizer, prompt)
    a = answer_ids(tokenizer, target)
    if len(p) >= max_length:
        return None
    ids = (p + a)[:max_length]
    labels = ([IGNORE_INDEX] * len(p) + a)[:max_length]
    return Encoded(ids, labels, len(p) + len(a) > max_length)


class RecordList:
    """Gold records carried through a batch untouched (Lightning moves tensors, not these)."""

    __slots__ = ("items",)

    def __init__(self, items: Sequence[Record]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, i):
        return self.items[i]


class BatchIndices(list):
    """One batch's example indices, with the answer tokens of the optimizer step it belongs to (all ranks)."""

    step_weight: Optional[int] = None


class SFTItems(list):
    """The examples of one batch as the DataLoader hands them to ``collate_sft``."""

    step_weight: Optional[int] = None


class SFTDataset(Dataset):
    def __init__(self, examples: list[Encoded]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Encoded:
        return self.examples[i]

    def __getitems__(self, indices) -> SFTItems:
        # the DataLoader passes the batch sampler's list through here, so its step weight reaches the collate
        items = SFTItems(self.examples[i] for i in indices)
        items.step_weight = getattr(indices, "step_weight", None)
        return items

    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.examples]

    def answer_tokens(self) -> list[int]:
        """Tokens each example's loss covers (labels other than IGNORE_INDEX after the first position)."""
        return [sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in self.examples]


class PromptDataset(Dataset):
    """Prompts with their gold records, for generation (validation, test, predict, GRPO rollouts)."""

    def __init__(self, records: list[Record], prompt_ids: list[list[int]]):
        self.records = records
        self.prompt_ids = prompt_ids

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        return self.records[i], self.prompt_ids[i]

    def lengths(self) -> list[int]:
        return [len(p) for p in self.prompt_ids]


def collate_sft(pad_id: int) -> Callable:
    def collate(items: list[Encoded]) -> dict:
        width = max(len(e.input_ids) for e in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, e in enumerate(items):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        weight = getattr(items, "step_weight", None)
        if weight is not None:
            batch["step_answer_tokens"] = torch.tensor(weight, dtype=torch.long)
        return batch

    return collate


def collate_prompts(pad_id: int) -> Callable:
    """Left-padded prompts (generation appends on the right) and the gold records."""

    def collate(items) -> dict:
        ids, mask = left_pad([p for _, p in items], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "records": RecordList([r for r, _ in items])}

    return collate


class EpochHandle:
    """What Lightning finds at ``batch_sampler.sampler``: it calls ``set_epoch`` there (and on ``loader.sampler``)
    at the start of every training epoch, never on a batch sampler itself; this passes the call on."""

    def __init__(self, owner: "LengthGroupedBatchSampler"):
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class LengthGroupedBatchSampler(Sampler):
    """Index batches; similar lengths together when ``group_by_length``; this rank's share only.

    Reshuffled every epoch by ``seed`` and the epoch Lightning hands to ``set_epoch`` (through
    :class:`EpochHandle` at ``.sampler``).  Given ``strata`` (a label per example, such as "the answer is
    empty"), every batch holds each stratum near its share of the data: length grouping then orders each
    stratum by length and interleaves them, instead of packing the shortest examples (the empty answers)
    into batches of their own.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, group_by_length: bool = True,
                 seed: int = 0, epoch: int = 0, num_replicas: int = 1, rank: int = 0, drop_last: bool = False,
                 mega_batch_mult: int = 16, weights: Optional[Sequence[int]] = None, accumulate: int = 1,
                 strata: Optional[Sequence] = None):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, not {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.epoch = epoch
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.mega = mega_batch_mult
        self.weights = None if weights is None else list(weights)
        if self.weights is not None and len(self.weights) != len(self.lengths):
            raise ValueError(f"{len(self.weights)} weights for {len(self.lengths)} examples")
        self.accumulate = max(1, int(accumulate))
        self.strata = None if strata is None else list(strata)
        if self.strata is not None and len(self.strata) != len(self.lengths):
            raise ValueError(f"{len(self.strata)} strata labels for {len(self.lengths)} examples")
        self.skip = 0
        self.sampler = EpochHandle(self)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{self.epoch}")
        idx = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(idx)
        step = self.batch_size
        if self.group_by_length:
            size = step * self.mega * self.num_replicas
            chunks = []
            for s in range(0, len(idx), size):
                mega = self._by_length(idx[s:s + size])
                chunks.extend(mega[j:j + step] for j in range(0, len(mega), step))
            batches = chunks
            if self.shuffle:
                rng.shuffle(batches)
        else:
            if self.strata is not None:
                idx = self._interleave(idx)
            batches = [idx[j:j + step] for j in range(0, len(idx), step)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == step]
        if self.num_replicas > 1 and batches:
            per_rank = -(-len(batches) // self.num_replicas)
            total = per_rank * self.num_replicas
            batches = batches + batches[: total - len(batches)]
        batches = [BatchIndices(b) for b in batches]
        if self.weights is not None:
            # rank r's j-th batch is batches[j * R + r]; an optimizer step takes `accumulate` consecutive ones per rank
            span = self.accumulate * self.num_replicas
            for s in range(0, len(batches), span):
                window = batches[s:s + span]
                total_weight = sum(self.weights[i] for b in window for i in b)
                for b in window:
                    b.step_weight = total_weight
        return batches[self.rank::self.num_replicas] if self.num_replicas > 1 else batches

    def _by_length(self, idx: list[int]) -> list[int]:
        """Longest first; with strata, each stratum longest first, interleaved by share."""
        if self.strata is None:
            return sorted(idx, key=lambda i: -self.lengths[i])
        return self._interleave(idx, key=lambda i: -self.lengths[i])

    def _interleave(self, idx: list[int], key=None) -> list[int]:
        """``idx`` with every stratum spread evenly: the k-th of a stratum's n members (in ``key`` order, or as
        given) sits at relative position (k + 1/2) / n, so any run of consecutive positions holds each stratum
        near its share."""
        groups: dict = {}
        for i in idx:
            groups.setdefault(self.strata[i], []).append(i)
        placed = []
        for g, members in enumerate(groups.values()):
            if key is not None:
                members = sorted(members, key=key)
            n = len(members)
            placed.extend(((k + 0.5) / n, g, i) for k, i in enumerate(members))
        return [i for _, _, i in sorted(placed)]

    def __iter__(self):
        batches = self._all_batches()
        skip, self.skip = self.skip, 0
        return iter(batches[skip:])

    def __len__(self) -> int:
        """Batches of a whole epoch on this rank (a resumed epoch yields fewer, the loop ends when they run out)."""
        return len(self._all_batches())


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`LengthGroupedBatchSampler` that Lightning can resume mid-epoch.

    Lightning keeps ``state_dict()`` in its checkpoints (the stateful-loader protocol).  ``consumed`` counts the
    batches training has taken this epoch: whoever feeds the batches to training calls :meth:`batch_consumed`
    once per batch (:class:`~prouie_pl.datamodules.UIEDataModule` does from ``on_after_batch_transfer``, which
    Lightning runs just before each training step, so batches the fetcher has prefetched are not counted).
    Loading that state makes the next iteration skip them.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.consumed = 0

    def __iter__(self):
        self.consumed = self.batch_sampler.skip  # a resumed epoch starts with the skipped batches consumed
        return super().__iter__()

    def batch_consumed(self) -> None:
        self.consumed += 1

    def state_dict(self) -> dict:
        return {"epoch": self.batch_sampler.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("epoch") == self.batch_sampler.epoch:
            self.batch_sampler.skip = int(state.get("consumed", 0))
