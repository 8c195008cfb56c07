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
from typing import Iterable, Optional

from .reader import DataError, load_records
from .schema import Record
from .scoring import METRICS, Scorer, overall_f1


@dataclass
class PredictionFile:
    outputs: dict[tuple[str, str, int], str] = field(default_factory=dict)
    datasets: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)


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


def score_outputs(records: Iterable[Record], outputs: dict[tuple[str, str, int], str], mode: str = "strict") -> dict:
    """Report for model outputs keyed by record uid (missing ones scored as empty)."""
    scorer = Scorer(mode)
    for rec in records:
        scorer.add(rec, outputs.get(rec.uid))
    return scorer.report()


def evaluate_file(data_dir: str | os.PathLike, split: str, predictions: str | os.PathLike, mode: str = "strict",
                  tasks: Optional[list[str]] = None, datasets: Optional[list[str]] = None,
                  max_records: Optional[int] = None, on_error: str = "error") -> Evaluation:
    """Score ``predictions`` against ``split`` of the data under ``data_dir``.

    By default the data sets named in the predictions file are scored; ``tasks``/``datasets`` choose others.
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
