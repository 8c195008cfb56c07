"""Micro precision/recall/F1 per data set and the unweighted mean over data sets per task, as the field reports.

Metrics: ``NER`` (entity text + type), ``RE_strict`` (head + relation type + tail), ``RE_boundary`` (head +
tail, any type), ``EE_trigger`` (trigger + event type), ``EE_argument`` (argument + role + event type).

``mode="strict"`` (default) matches case-insensitive, whitespace-normalised strings; a unit predicted twice
counts once, and an empty prediction on an empty gold adds nothing.  ``mode="instructuie"`` reproduces the
InstructUIE scorer for NER and RE (see :mod:`prouie_pl.scoring_instructuie`); EE has no InstructUIE
counterpart there and is scored strictly, which the report says.  Every report counts parse failures.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from .parser import ParseResult, parse_output
from .schema import Record, Unit, record_units
from .scoring_instructuie import score_record as instructuie_record

METRICS: tuple[str, ...] = ("NER", "RE_strict", "RE_boundary", "EE_trigger", "EE_argument")
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "NER": ("NER",),
    "RE": ("RE_strict", "RE_boundary"),
    "EE": ("EE_trigger", "EE_argument"),
}
MODES: tuple[str, ...] = ("strict", "instructuie")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def _share(num, den):
    """``num / den``, 0 where ``den`` is 0 (``num`` is 0 there too); elementwise on numpy arrays."""
    return num / (den + (den == 0))


def precision_recall_f1(tp, fp, fn):
    """Precision, recall and F1 (percent) from counts, 0 where undefined; F1 = 2PR / (P + R).

    Works elementwise on numpy arrays of counts too (bootstrap resamples), with the same arithmetic.
    """
    p = _share(100.0 * tp, tp + fp)
    r = _share(100.0 * tp, tp + fn)
    return p, r, _share(2 * p * r, p + r)


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, tp: int, fp: int, fn: int) -> None:
        self.tp += tp
        self.fp += fp
        self.fn += fn

    @property
    def precision(self) -> float:
        return precision_recall_f1(self.tp, self.fp, self.fn)[0]

    @property
    def recall(self) -> float:
        return precision_recall_f1(self.tp, self.fp, self.fn)[1]

    @property
    def f1(self) -> float:
        return precision_recall_f1(self.tp, self.fp, self.fn)[2]


def metric_keys(units: Iterable[Unit], metric: str) -> set:
    """The set of matching keys a metric counts (normalised strings, duplicates merged)."""
    if metric == "NER":
        return {u.key() for u in units if u.kind == "entity"}
    if metric == "RE_strict":
        return {u.key() for u in units if u.kind == "relation"}
    if metric == "RE_boundary":
        return {u.key()[1::2] for u in units if u.kind == "relation"}  # (head, tail)
    if metric == "EE_trigger":
        return {u.key() for u in units if u.kind == "trigger"}
    if metric == "EE_argument":
        return {u.key() for u in units if u.kind == "argument"}
    raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def set_counts(gold: set, pred: set) -> tuple[int, int, int]:
    tp = len(gold & pred)
    return tp, len(pred) - tp, len(gold) - tp


def units_f1(gold_units: list[Unit], pred_units: list[Unit], task: str) -> float:
    """F1 (0-1) of one prediction against one gold record over all of the task's unit kinds.

    Empty gold and empty prediction score 1 (nothing to find, nothing wrongly found): the GRPO outcome reward
    uses this, and a perfect empty answer deserves the full reward.
    """
    metrics = ("NER",) if task == "NER" else ("RE_strict",) if task == "RE" else ("EE_trigger", "EE_argument")
    c = Counts()
    for m in metrics:
        c.add(*set_counts(metric_keys(gold_units, m), metric_keys(pred_units, m)))
    if c.tp + c.fp + c.fn == 0:
        return 1.0
    return c.f1 / 100.0


class Scorer:
    """Accumulates counts per metric and data set; :meth:`report` gives the ``report.json`` structure."""

    def __init__(self, mode: str = "strict"):
        self.mode = check_mode(mode)
        self.counts: dict[str, dict[str, Counts]] = defaultdict(lambda: defaultdict(Counts))
        self.n: dict[tuple[str, str], int] = defaultdict(int)
        self.failures: dict[tuple[str, str], int] = defaultdict(int)
        self.missing: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, record: Record, output: Optional[str], unit_scores: Optional[Sequence[float]] = None,
            threshold: float = 0.0) -> ParseResult:
        """Score one model output (raw text; ``None`` for a missing prediction, scored as empty).

        With ``threshold`` > 0 only the units whose score (``unit_scores``, one per parsed unit in parse order;
        :mod:`prouie_pl.confidence`) is above it count; an answer without scores then keeps nothing."""
        key = (record.task, record.dataset)
        self.n[key] += 1
        missing = output is None
        if missing:
            self.missing[key] += 1
            output = ""
        parsed = parse_output(output, record.task, record.schema)
        gold = record_units(record)
        units = parsed.units
        if threshold > 0.0:
            if self.mode != "strict":
                raise ValueError(f"a unit-score threshold works with the strict scorer, not mode={self.mode!r}")
            scores = list(unit_scores) if unit_scores is not None else []
            if unit_scores is not None and len(scores) != len(units):
                raise ValueError(f"{record.task}/{record.dataset} record {record.index}: {len(scores)} unit scores for "
                                 f"{len(units)} parsed units (the scores belong to another output?)")
            units = [u for u, s in zip(units, scores) if s > threshold]
        counts = {m: set_counts(metric_keys(gold, m), metric_keys(units, m)) for m in TASK_METRICS[record.task]}
        failed = not parsed.ok
        if self.mode == "instructuie" and record.task in ("NER", "RE"):
            compat, failed = instructuie_record(record, output, parsed)
            counts.update(compat)
        for metric, c in counts.items():
            self.counts[metric][record.dataset].add(*c)
        if failed and not missing:
            self.failures[key] += 1
        return parsed

    def report(self) -> dict:
        tasks: dict[str, dict] = {}
        for task, metrics in TASK_METRICS.items():
            for metric in metrics:
                per = self.counts.get(metric)
                if not per:
                    continue
                datasets = {}
                for ds in sorted(per):
                    c = per[ds]
                    datasets[ds] = {
                        "precision": round(c.precision, 4),
                        "recall": round(c.recall, 4),
                        "f1": round(c.f1, 4),
                        "tp": c.tp,
                        "fp": c.fp,
                        "fn": c.fn,
                        "n": self.n[(task, ds)],
                        "parse_failures": self.failures[(task, ds)],
                        "missing_predictions": self.missing[(task, ds)],
                    }
                avg = sum(d["f1"] for d in datasets.values()) / len(datasets)
                entry = {"datasets": datasets, "average_f1": round(avg, 4)}
                if self.mode == "instructuie" and metric not in ("NER", "RE_strict"):
                    entry["scored_as"] = "strict (the InstructUIE scorer has no counterpart of this metric)"
                tasks[metric] = entry
        return {"mode": self.mode, "tasks": tasks}


def task_scores(report: dict) -> dict[str, float]:
    """One F1 per task present: NER, RE_strict, and for EE the mean of trigger and argument F1."""
    t = report["tasks"]
    out = {}
    if "NER" in t:
        out["NER"] = t["NER"]["average_f1"]
    if "RE_strict" in t:
        out["RE"] = t["RE_strict"]["average_f1"]
    ee = [t[m]["average_f1"] for m in ("EE_trigger", "EE_argument") if m in t]
    if ee:
        out["EE"] = sum(ee) / len(ee)
    return out


def parse_failures(report: dict) -> int:
    """Unparsable answers in a report (missing predictions not counted).

    Every metric of a task repeats its data sets' failure count, so one metric per task is summed."""
    t = report["tasks"]
    return sum(v["parse_failures"] for metrics in TASK_METRICS.values() if metrics[0] in t for v in t[metrics[0]]["datasets"].values())


def overall_f1(report: dict) -> float:
    """The number model selection and early stopping watch: the mean of :func:`task_scores`."""
    scores = task_scores(report)
    return sum(scores.values()) / len(scores) if scores else 0.0
