"""Score a predictions file against the gold data: the ``evaluate`` command and the reports of training runs.

A predictions file is JSON lines, one per record: ``{"task", "dataset", "index", "output"}`` where ``index`` is
the record's position in its split file and ``output`` the raw model text.  A file written by ``render`` is
a valid (perfect) predictions file.  Lines for records that do not exist are reported; records without a
prediction are reported and scored as empty outputs.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .reader import DataError, load_records
from .schema import Record
from .scoring import METRICS, Scorer, overall_f1


@dataclass
class PredictionFile:
    outputs: dict[tuple[str, str, int], str] = field(default_factory=dict)
    datasets: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    # per record uid: the score of each parsed unit (``unit_scores`` in the file; test/predict write them)
    unit_scores: dict[tuple[str, str, int], list[float]] = field(default_factory=dict)


def read_predictions(path: str | os.PathLike) -> PredictionFile:
    """Read a predictions JSONL file; a malformed line raises :class:`DataError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"predictions file {str(path)!r} does not exist")
    pf = PredictionFile()
    problems = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}: line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{path}: line {lineno}: a prediction must be a JSON object")
                continue
            missing = [k for k in ("task", "dataset", "index", "output") if k not in obj]
            if missing:
                problems.append(f"{path}: line {lineno}: missing field(s) {', '.join(missing)}")
                continue
            if not isinstance(obj["index"], int) or not isinstance(obj["output"], str):
                problems.append(f"{path}: line {lineno}: 'index' must be an integer and 'output' a string")
                continue
            key = (str(obj["task"]).upper(), str(obj["dataset"]), obj["index"])
            if key in pf.outputs:
                pf.duplicates.append(f"{path}: line {lineno}: second prediction for {key[0]}/{key[1]} record {key[2]} (the first one is kept)")
                continue
            scores = obj.get("unit_scores")
            if scores is not None:
                if not isinstance(scores, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
                    problems.append(f"{path}: line {lineno}: 'unit_scores' must be a list of numbers")
                    continue
                pf.unit_scores[key] = [float(x) for x in scores]
            pf.outputs[key] = obj["output"]
            if key[:2] not in pf.datasets:
                pf.datasets.append(key[:2])
    if problems:
        raise DataError(problems, hint="every line needs task, dataset, index (record index in the split file) and output")
    return pf


@dataclass
class Evaluation:
    report: dict
    unknown: list[str]
    missing: list[str]
    duplicates: list[str]


def score_outputs(records: Iterable[Record], outputs: dict[tuple[str, str, int], str], mode: str = "strict",
                  unit_scores: Optional[dict] = None, threshold: float = 0.0) -> dict:
    """Report for model outputs keyed by record uid (missing ones scored as empty); with ``threshold`` only the
    units scored above it count (``unit_scores`` per uid)."""
    scorer = Scorer(mode)
    unit_scores = unit_scores or {}
    for rec in records:
        scorer.add(rec, outputs.get(rec.uid), unit_scores=unit_scores.get(rec.uid), threshold=threshold)
    return scorer.report()


def threshold_sweep(records: list[Record], pf: PredictionFile, thresholds: Sequence[float]) -> list[dict]:
    """Precision, recall and F1 per metric and data set (and overall F1) at each threshold (strict scorer)."""
    from .confidence import check_threshold

    missing = [f"{t}/{d} record {i}" for (t, d, i) in pf.outputs if (t, d, i) not in pf.unit_scores]
    if missing and any(float(x) > 0 for x in thresholds):
        raise DataError(f"{len(missing)} prediction(s) have no unit_scores (first: {missing[0]}), so a threshold cannot "
                        "filter them", hint="decode with test/predict or extract, which write unit_scores")
    rows = []
    for t in thresholds:
        t = check_threshold(t, "--thresholds")
        report = score_outputs(records, pf.outputs, "strict", pf.unit_scores, t)
        cells = {f"{m}/{ds}": {k: v[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")}
                 for m, entry in report["tasks"].items() for ds, v in entry["datasets"].items()}
        rows.append({"threshold": t, "overall_f1": round(overall_f1(report), 4), "metrics": cells})
    return rows


def print_sweep(rows: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title="threshold sweep (strict; a unit counts when its score is above the threshold)")
    table.add_column("threshold", justify="right")
    keys = list(rows[0]["metrics"]) if rows else []
    for k in keys:
        table.add_column(f"{k} P / R / F1", justify="right")
    table.add_column("overall F1", justify="right")
    for r in rows:
        table.add_row(f"{r['threshold']:.2f}", *(f"{r['metrics'][k]['precision']:.1f} / {r['metrics'][k]['recall']:.1f} / "
                                                 f"{r['metrics'][k]['f1']:.1f}" for k in keys), f"{r['overall_f1']:.1f}")
    console.print(table)


def evaluate_file(data_dir: str | os.PathLike, split: str, predictions: str | os.PathLike, mode: str = "strict",
                  tasks: Optional[list[str]] = None, datasets: Optional[list[str]] = None,
                  max_records: Optional[int] = None, on_error: str = "error",
                  thresholds: Optional[Sequence[float]] = None) -> Evaluation:
    """Score ``predictions`` against ``split`` of the data under ``data_dir``.

    By default the data sets named in the predictions file are scored; ``tasks``/``datasets`` choose others.
    ``thresholds`` adds ``report["threshold_sweep"]`` (:func:`threshold_sweep`).
    """
    pf = read_predictions(predictions)
    if tasks is None and datasets is None:
        if not pf.datasets:
            raise DataError(f"{predictions}: no predictions in the file")
        datasets = [f"{t}/{d}" for t, d in pf.datasets]
    records = load_records(data_dir, split, tasks=tasks, datasets=datasets, max_records=max_records, on_error=on_error)
    known = {r.uid for r in records}
    unknown = [f"{t}/{d} record {i}: no such record in {split}" for (t, d, i) in pf.outputs if (t, d, i) not in known]
    missing = [f"{t}/{d} record {i}: no prediction (scored as an empty output)" for (t, d, i) in sorted(known - set(pf.outputs))]
    report = score_outputs(records, pf.outputs, mode)
    report["split"] = split
    report["overall_f1"] = round(overall_f1(report), 4)
    report["unknown_predictions"] = len(unknown)
    report["missing_predictions"] = len(missing)
    if thresholds:
        report["threshold_sweep"] = threshold_sweep(records, pf, thresholds)
    return Evaluation(report, unknown, missing, pf.duplicates)


def print_report(report: dict, title: str = "Evaluation", console=None) -> None:
    """A rich table: one row per data set and metric, then the task averages."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 120)
    table = Table(title=f"{title} ({report.get('mode', 'strict')} mode)")
    for col in ("metric", "data set", "P", "R", "F1", "n", "parse failures"):
        numeric = col in ("P", "R", "F1", "n", "parse failures")
        table.add_column(col, justify="right" if numeric else "left", no_wrap=not numeric)
    for metric in METRICS:
        entry = report["tasks"].get(metric)
        if not entry:
            continue
        for ds, v in entry["datasets"].items():
            table.add_row(metric, ds, f"{v['precision']:.2f}", f"{v['recall']:.2f}", f"{v['f1']:.2f}", str(v["n"]), str(v["parse_failures"]))
        table.add_row(f"[bold]{metric}[/bold]", "[bold]average[/bold]", "", "", f"[bold]{entry['average_f1']:.2f}[/bold]", "", "", end_section=True)
    console.print(table)
