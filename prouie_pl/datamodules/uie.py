"""``UIEDataModule``: the one LightningDataModule of all three ProUIE stages.

* ``stage="cm"`` (Complete Modeling): the full training data in curriculum phases NER -> RE -> EE
  (:mod:`.curriculum`), full target format, supervised batches.
* ``stage="sa"`` (Streamlined Alignment): a stratified sample per data set (:mod:`.sampling`), concise
  format, supervised batches.
* ``stage="de"`` (Deep Exploration): prompts of the training data (all, or a stratified sample), concise
  format, with their gold records for the GRPO reward.

Validation, test and predict loaders always yield left-padded prompts with their gold records, for
generation-based evaluation.  Every loader shards its records across ranks itself, which is why the CLI sets
``trainer.use_distributed_sampler=False``.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path
from typing import Literal, Optional, Union

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from ..demo_data import DATA_DIR_ALIASES
from ..formats import check_format
from ..reader import DataError, LoadReport
from ..schema import Record
from ..sources import SourceSpec, load_rows, resolve_sources, rows_to_records, source_specs
from .batching import LengthGroupedBatchSampler, PromptDataset, ResumableDataLoader, chat_prompt_ids, collate_prompts, collate_sft
from .curriculum import Curriculum, Phase
from .sampling import stratified_indices
from .tokenized import ArrowSFTDataset, encode_rows

STAGE_FORMAT = {"cm": "full", "sa": "concise", "de": "concise"}


def resolve_data_dir(data_dir: str) -> Path:
    """``demo`` (synthetic) and ``demo_real`` (subsets of public benchmarks) name the embedded data; anything else is a path."""
    if data_dir in DATA_DIR_ALIASES:
        return DATA_DIR_ALIASES[data_dir]()
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        names = " or ".join(DATA_DIR_ALIASES)
        raise DataError(f"data.data_dir {data_dir!r} does not exist or is not a folder (expected ROOT/{{NER,RE,EE}}/<Dataset>/, "
                        f"or {names} for the embedded data)")
    return path


class UIEDataModule(L.LightningDataModule):
    """Data for the CM, SA and DE stages.

    Args:
        data_dir: root of the IE INSTRUCTIONS layout, ``demo`` for the embedded synthetic demo data, or ``demo_real``
            for the embedded subsets of three public benchmarks (``prouie_pl/demo_data/real/LICENSES.md``);
            ignored when ``sources`` is given.
        sources: data sources (:class:`prouie_pl.sources.SourceSpec`): IE INSTRUCTIONS folders, ``load_dataset``
            sources with a column mapping, CoNLL / BIO files or token + tag data sets.
        stage: ``cm`` (curriculum SFT, full format), ``sa`` (sampled SFT, concise) or ``de`` (GRPO prompts).
        tasks: tasks to use (NER, RE, EE); default all present.
        datasets: data sets by ``Name`` or ``TASK/Name``; default all.
        max_train_records: cap on training records per data set (before SA sampling).
        max_val_records: cap per data set on the dev records decoded in generation-based validation.
        max_test_records: cap per data set on test (and predict) records.
        on_error: bad records stop the run (``error``) or are dropped and counted (``skip``).
        target_format: override the stage's format (``full`` for cm, ``concise`` for sa and de).
        schedule: CM curriculum: ``sequential`` (one phase per task), ``cumulative`` or ``mixed``.
        epochs_per_phase: epochs of each CM phase (one number for all, or one per phase).
        replay_fraction: sequential schedule: share of each earlier task's records mixed into later phases.
        sample_per_dataset: SA/DE: records sampled per data set (stratified by number of structural units).
        sample_fraction: SA/DE: fraction sampled per data set instead of a count.
        shuffle_labels: shuffle the label order of training prompts (and full-format keys) per epoch.
        tokenizer: tokenizer path or hub id; default the model's own tokenizer.
        max_seq_length: cap on prompt + answer tokens; longer answers are cut and counted.
        batch_size: training batch size per device (GRPO: prompts per step).
        eval_batch_size: prompts per generation batch in validation, test and predict.
        group_by_length: batch records of similar length together to cut padding.
        num_workers: DataLoader worker processes.
        predict_split: split decoded by ``predict``.
        seed: seed of sampling, shuffling and label shuffling.
        cache_dir: where ``datasets`` caches validated rows and token ids (default its own, ``HF_DATASETS_CACHE``).
        num_proc: processes for tokenising (``Dataset.map``); default one.
    """

    def __init__(
        self,
        data_dir: str = "demo",
        stage: Literal["cm", "sa", "de"] = "cm",
        tasks: Optional[list[str]] = None,
        datasets: Optional[list[str]] = None,
        max_train_records: Optional[int] = None,
        max_val_records: Optional[int] = 50,
        max_test_records: Optional[int] = None,
        on_error: Literal["error", "skip"] = "error",
        target_format: Optional[Literal["full", "concise", "keyed"]] = None,
        schedule: Literal["sequential", "cumulative", "mixed"] = "sequential",
        epochs_per_phase: Union[int, list[int]] = 1,
        replay_fraction: float = 0.0,
        sample_per_dataset: Optional[int] = None,
        sample_fraction: Optional[float] = None,
        shuffle_labels: bool = False,
        tokenizer: Optional[str] = None,
        max_seq_length: int = 1024,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        group_by_length: bool = True,
        num_workers: int = 0,
        predict_split: Literal["train", "dev", "test"] = "test",
        seed: int = 42,
        sources: Optional[list[SourceSpec]] = None,
        cache_dir: Optional[str] = None,
        num_proc: Optional[int] = None,
    ):
        super().__init__()
        if stage not in STAGE_FORMAT:
            raise ValueError(f"data.stage must be one of cm, sa, de, not {stage!r}")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.stage = stage
        self.tasks = tasks
        self.datasets = datasets
        self.max_train_records = max_train_records
        self.max_val_records = max_val_records
        self.max_test_records = max_test_records
        self.on_error = on_error
        self.format = check_format(target_format or STAGE_FORMAT[stage], "data.target_format")
        self.schedule = schedule
        self.epochs_per_phase = epochs_per_phase
        self.replay_fraction = replay_fraction
        self.sample_per_dataset = sample_per_dataset
        self.sample_fraction = sample_fraction
        self.shuffle_labels = shuffle_labels
        self.tokenizer_name = tokenizer
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.group_by_length = group_by_length
        self.num_workers = num_workers
        self.predict_split = predict_split
        self.seed = seed
        self.sources = sources
        self.cache_dir = cache_dir
        self.num_proc = num_proc
        if stage == "cm" and (sample_per_dataset is not None or sample_fraction is not None):
            raise ValueError("data.sample_per_dataset / data.sample_fraction apply to the sa and de stages; CM trains on the full data")
        if stage == "sa" and sample_per_dataset is None and sample_fraction is None:
            raise ValueError("the sa stage needs data.sample_per_dataset or data.sample_fraction")
        self._tokenizer = None
        self._sets = None
        self.train_parts: list = []  # (SourceSet, rows) per data set: the training rows, memory-mapped
        self._train_records: Optional[list[Record]] = None
        self._task: list[str] = []
        self._group: list[tuple[str, str]] = []
        self._units: list[int] = []
        self.val_records: list[Record] = []
        self.test_records: list[Record] = []
        self.predict_records: list[Record] = []
        self.curriculum: Optional[Curriculum] = None
        self.stats: Counter = Counter()
        self._encoded: dict = {}
        self._announced_phase: Optional[int] = None
        self._train_loader: Optional[ResumableDataLoader] = None
        self.load_report = LoadReport()

    # ------------------------------------------------------------------ set-up

    def connect(self, tokenizer) -> "UIEDataModule":
        """Hand over the tokenizer of the model these batches feed (a ``data.tokenizer`` of its own wins).

        The command line and the pipeline wire module and data through :func:`prouie_pl.wiring.connect`; code
        that builds a trainer by hand calls that, or this, before ``fit``."""
        if self.tokenizer_name is None:
            self._tokenizer = tokenizer
        return self

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_name is None:
                raise RuntimeError("UIEDataModule has no tokenizer: pass data.tokenizer, or call "
                                   "prouie_pl.wiring.connect(module, data, trainer) (or data.connect(module.tokenizer)) before fit")
            from ..modeling import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def source_sets(self):
        """The selected data sets of ``sources`` (or of ``data_dir``), resolved once."""
        if self._sets is None:
            specs = self.sources if self.sources else source_specs(resolve_data_dir(self.data_dir), None)
            self._sets = resolve_sources(specs, self.cache_dir, self.tasks, self.datasets)
        return self._sets

    def _rows(self, split: str, cap: Optional[int]) -> list:
        if cap is not None and cap < 0:
            raise DataError(f"a record cap must be >= 0, not {cap}")
        return load_rows(self.source_sets(), split, cap, self.on_error, self.load_report)

    def _load(self, split: str, cap: Optional[int]) -> list[Record]:
        if cap == 0:
            return []
        return [r for s, rows in self._rows(split, cap) for r in rows_to_records(rows, {(s.task, s.name): s.schema}, split)]

    @property
    def train_records(self) -> list[Record]:
        """The training records as objects (built on first use; training itself reads the Arrow rows)."""
        if self._train_records is None:
            self._train_records = [r for s, rows in self.train_parts
                                   for r in rows_to_records(rows, {(s.task, s.name): s.schema}, "train")]
        return self._train_records

    def _row_columns(self) -> None:
        """Per training row (all data sets in order): its task, ``(task, data set)`` and unit count."""
        self._task, self._group, self._units = [], [], []
        for s, rows in self.train_parts:
            self._task.extend([s.task] * len(rows))
            self._group.extend([(s.task, s.name)] * len(rows))
            self._units.extend(rows["units"])

    def setup(self, stage: str) -> None:
        if stage == "fit":
            if not self.train_parts:
                parts = self._rows("train", self.max_train_records)
                if not sum(len(rows) for _, rows in parts):
                    raise DataError(f"no training records under {self.data_dir if not self.sources else 'data.sources'} for the selected tasks/datasets")
                self.train_parts = parts
                self._row_columns()
                if self.stage in ("sa", "de") and (self.sample_per_dataset is not None or self.sample_fraction is not None):
                    keep = stratified_indices(self._group, self._units, self.sample_per_dataset, self.sample_fraction, self.seed)
                    offset, sampled = 0, []
                    for s, rows in parts:
                        mine = [i - offset for i in keep if offset <= i < offset + len(rows)]
                        sampled.append((s, rows.select(mine)))
                        offset += len(rows)
                    self.train_parts, self._train_records = sampled, None
                    self._row_columns()
                if self.stage == "cm":
                    present = sorted(set(self._task))
                    self.curriculum = Curriculum(self.schedule, present, self.epochs_per_phase, self.replay_fraction)
                    rank_zero_info(f"[prouie] CM curriculum {self.curriculum.describe()}")
                rank_zero_info(f"[prouie] {self.stage} training records: " + ", ".join(f"{s.id} {len(rows)}" for s, rows in self.train_parts if len(rows)))
            if not self.val_records:
                self.val_records = self._load("dev", self.max_val_records)
        if stage == "validate" and not self.val_records:
            self.val_records = self._load("dev", self.max_val_records)
        if stage == "test" and not self.test_records:
            self.test_records = self._load("test", self.max_test_records)
        if stage == "predict" and not self.predict_records:
            self.predict_records = self._load(self.predict_split, self.max_test_records)
        if self.load_report.skipped:
            rank_zero_info(f"[prouie] {self.load_report.summary()}")

    # ------------------------------------------------------------------ distribution

    def _world(self) -> tuple[int, int]:
        t = self.trainer
        if t is None:
            return 1, 0
        return max(1, t.world_size), t.global_rank

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    # ------------------------------------------------------------------ training data

    def phase_rows(self, epoch: int) -> tuple[Optional[Phase], list[int]]:
        """Positions (over all training rows, data sets in order) trained in ``epoch``: CM trains the epoch's
        curriculum phase with replay, SA and DE every row."""
        if self.curriculum is None:
            return None, list(range(len(self._task)))
        phase = self.curriculum.phase(epoch)
        rows = [i for i, t in enumerate(self._task) if t in phase.tasks]
        if phase.replay_tasks and self.replay_fraction > 0:
            rng = random.Random(f"{self.seed}/replay/{epoch}")
            for task in phase.replay_tasks:
                pool = [i for i, t in enumerate(self._task) if t == task]
                k = int(round(self.replay_fraction * len(pool)))
                rows.extend(rng.sample(pool, k))
        return phase, rows

    def encoded(self, epoch: int):
        """Token ids of every training row (one Arrow table, data sets in order), cached by ``datasets``; with
        ``shuffle_labels`` each epoch has its own label orders."""
        from datasets import concatenate_datasets

        shuffle_seed = f"{self.seed}/labels/{epoch}" if self.shuffle_labels else None
        if shuffle_seed not in self._encoded:
            parts = [encode_rows(rows, self.tokenizer, s.schema, self.format, self.max_seq_length, shuffle_seed, self.num_proc)
                     for s, rows in self.train_parts if len(rows)]
            table = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
            self._encoded = {shuffle_seed: (table, table["dropped"], table["truncated"])}
        return self._encoded[shuffle_seed]

    def _sft_dataset(self, rows: list[int], epoch: int) -> ArrowSFTDataset:
        table, dropped, truncated = self.encoded(epoch)
        keep = [i for i in rows if not dropped[i]]
        if len(keep) < len(rows):
            self.stats["dropped: prompt longer than max_seq_length"] += len(rows) - len(keep)
        cut = sum(1 for i in keep if truncated[i])
        if cut:
            self.stats["answer cut at max_seq_length"] += cut
        return ArrowSFTDataset(table, keep)

    def train_dataloader(self):
        epoch = self._epoch()
        phase, rows = self.phase_rows(epoch)
        if (phase is not None and len(self.curriculum.phases) > 1 and self.trainer is not None
                and self.trainer.reload_dataloaders_every_n_epochs != 1):
            raise ValueError(f"the CM curriculum ({self.curriculum.describe()}) changes the training data every phase: "
                             "add prouie_pl.callbacks.CurriculumCallback to trainer.callbacks")
        if phase is not None and self._announced_phase != self.curriculum.phase_index(epoch):
            self._announced_phase = self.curriculum.phase_index(epoch)
            rank_zero_info(f"[prouie] epoch {epoch}: curriculum phase {self._announced_phase + 1}/{len(self.curriculum.phases)} ({phase.name}), {len(rows)} records")
        world, rank = self._world()
        if self.stage == "de":
            records = self.train_records
            dataset = self._prompts([records[i] for i in rows])
            collate = collate_prompts(self.tokenizer.pad_token_id)
        else:
            self.stats.clear()
            dataset = self._sft_dataset(rows, epoch)
            if self.stats:
                rank_zero_info("[prouie] " + ", ".join(f"{n} {k}" for k, n in self.stats.items()))
            collate = collate_sft(self.tokenizer.pad_token_id)
        if len(dataset) == 0:
            raise DataError(f"no training examples left for epoch {epoch} (raise data.max_seq_length?)")
        sft = isinstance(dataset, ArrowSFTDataset)
        weights = dataset.answer_tokens() if sft else None
        # "nothing found" answers ({} in the concise format) are the shortest: spread them over the batches at
        # their share of the data instead of letting length grouping pack them together
        strata = [self._units[i] == 0 for i in dataset.indices] if sft else None
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        sampler = LengthGroupedBatchSampler(dataset.lengths(), self.batch_size, shuffle=True, group_by_length=self.group_by_length,
                                            seed=self.seed, epoch=epoch, num_replicas=world, rank=rank,
                                            weights=weights, accumulate=accumulate, strata=strata)
        self._train_loader = ResumableDataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers)
        return self._train_loader

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning runs this just before each step: a training batch counts as consumed for mid-epoch resume."""
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_loader is not None:
            self._train_loader.batch_consumed()
        return batch

    def batches_in_epoch(self, epoch: int, world_size: int = 1) -> int:
        _, rows = self.phase_rows(epoch)
        return max(1, math.ceil(math.ceil(len(rows) / self.batch_size) / world_size))

    def planned_optimizer_steps(self, max_epochs: int, accumulate: int = 1, world_size: int = 1,
                                limit_batches: Union[int, float, None] = None) -> int:
        """Optimizer steps over ``max_epochs`` epochs (phases may differ in size), for LR schedules;
        ``limit_batches`` is ``trainer.limit_train_batches`` (a count, or a share of each epoch, as Lightning
        reads it): an epoch cut to fewer batches plans fewer steps, so the schedule still decays."""
        def batches(e: int) -> int:
            n = self.batches_in_epoch(e, world_size)
            if limit_batches is None or (isinstance(limit_batches, float) and limit_batches >= 1.0):
                return n
            if isinstance(limit_batches, float):
                return max(1, int(n * limit_batches))
            return max(1, min(n, int(limit_batches)))

        return sum(math.ceil(batches(e) / accumulate) for e in range(max_epochs))

    # ------------------------------------------------------------------ generation data

    def _prompts(self, records: list[Record]) -> PromptDataset:
        tok = self.tokenizer
        from ..formats import build_prompt

        return PromptDataset(records, [chat_prompt_ids(tok, build_prompt(r, self.format)) for r in records])

    def _eval_loader(self, records: list[Record]):
        world, rank = self._world()
        shard = records[rank::world]
        dataset = self._prompts(shard)
        # decode in length order: batches of similar prompt length pad less
        sampler = LengthGroupedBatchSampler(dataset.lengths(), self.eval_batch_size, shuffle=False, group_by_length=True, seed=self.seed)
        from torch.utils.data import DataLoader

        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_prompts(self.tokenizer.pad_token_id), num_workers=self.num_workers)

    def val_dataloader(self):
        return self._eval_loader(self.val_records)

    def test_dataloader(self):
        return self._eval_loader(self.test_records)

    def predict_dataloader(self):
        return self._eval_loader(self.predict_records)
