"""What decoding and scoring one split gave: the report and the predictions, in memory.

:class:`EvalResult` is built by the generation evaluator after ``test``/``predict`` and handed to the pipeline
and the reports as it is; ``predictions.jsonl`` and ``report.json`` are written from it once, for people (and
for ``evaluate``, which reads that predictions format).  :meth:`EvalResult.load` reads them back, for a finished
stage of an earlier run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .parser import parse_output
from .schema import Record
from .scoring import Scorer, overall_f1, parse_failures, task_scores

REPORT = "report.json"
PREDICTIONS = "predictions.jsonl"


@dataclass(frozen=True)
class Prediction:
    """One decoded answer: the record it answers (by uid), the raw model text and whether the length cap cut it."""

    task: str
    dataset: str
    index: int
    output: str
    truncated: bool = False
    # the score of each unit the parser reads from ``output``, in its order (:mod:`prouie_pl.confidence`)
    unit_scores: Optional[tuple[float, ...]] = None
    looped: bool = False  # the loop guard ended it (:class:`prouie_pl.decoding.LoopGuard`); ``truncated`` too

    @property
    def uid(self) -> tuple[str, str, int]:
        return (self.task, self.dataset, self.index)

    def to_json(self) -> dict:
        out = {"task": self.task, "dataset": self.dataset, "index": self.index, "output": self.output, "truncated": self.truncated}
        if self.looped:
            out["looped"] = True
        if self.unit_scores is not None:
            out["unit_scores"] = list(self.unit_scores)
        return out


def answer_problem(output: Optional[str], record: Optional[Record]) -> Optional[str]:
    """``"blank"`` for an empty answer, ``"no structures"`` for one the parser finds no unit in (unparsable or
    an answer with nothing in it; unknown without the record), else ``None``."""
    if not (output or "").strip():
        return "blank"
    if record is not None and not parse_output(output, record.task, record.schema).units:
        return "no structures"
    return None


@dataclass
class EvalResult:
    """The scores of one split (``report``, the structure of ``report.json``) and the answers behind them."""

    report: dict
    predictions: list[Prediction] = field(default_factory=list)

    @classmethod
    def score(cls, rows: Iterable[tuple], mode: str = "strict", split: Optional[str] = None,
              threshold: float = 0.0) -> "EvalResult":
        """Score ``(record, output, truncated[, unit scores[, looped]])`` rows; the predictions come out ordered by
        task, data set, index.  ``threshold`` keeps only units scored above it (see :mod:`prouie_pl.confidence`)."""
        rows = sorted(rows, key=lambda x: (x[0].task, x[0].dataset, x[0].index))
        rows = [(r[0], r[1], r[2], r[3] if len(r) > 3 else None, bool(r[4]) if len(r) > 4 else False) for r in rows]
        scorer = Scorer(mode)
        for rec, out, _, scores, _ in rows:
            scorer.add(rec, out, unit_scores=scores, threshold=threshold)
        report = scorer.report()
        report["overall_f1"] = round(overall_f1(report), 4)
        report["truncated_outputs"] = sum(1 for row in rows if row[2])
        report["looped_outputs"] = sum(1 for row in rows if row[4])
        report["n"] = len(rows)
        if threshold:
            report["threshold"] = threshold
        if split is not None:
            report["split"] = split
        return cls(report, [Prediction(rec.task, rec.dataset, rec.index, out, bool(cut),
                                       None if sc is None else tuple(round(float(x), 6) for x in sc), loop)
                            for rec, out, cut, sc, loop in rows])

    # ------------------------------------------------------------------ what the report says

    @property
    def tasks(self) -> dict:
        """Per metric: ``datasets`` (P, R, F1, counts, parse failures per data set) and ``average_f1``."""
        return self.report["tasks"]

    @property
    def split(self) -> Optional[str]:
        return self.report.get("split")

    @property
    def overall_f1(self) -> Optional[float]:
        return self.report.get("overall_f1")

    @property
    def task_scores(self) -> dict[str, float]:
        return task_scores(self.report)

    @property
    def n(self) -> int:
        return self.report.get("n", len(self.predictions))

    @property
    def parse_failures(self) -> int:
        return parse_failures(self.report)

    @property
    def truncated(self) -> int:
        return self.report.get("truncated_outputs", 0)

    @property
    def looped(self) -> int:
        """Answers the loop guard ended (counted in :attr:`truncated` too)."""
        return self.report.get("looped_outputs", 0)

    def outputs(self) -> dict[tuple[str, str, int], str]:
        """Raw output per record uid."""
        return {p.uid: p.output for p in self.predictions}

    # ------------------------------------------------------------------ files

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``predictions.jsonl`` and ``report.json`` into ``folder``; return their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        preds, report = folder / PREDICTIONS, folder / REPORT
        with preds.open("w", encoding="utf-8") as fh:
            for p in self.predictions:
                fh.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
        report.write_text(json.dumps(self.report, indent=2) + "\n", encoding="utf-8")
        return preds, report

    @classmethod
    def load(cls, folder: str | Path) -> "EvalResult":
        """Read back what :meth:`write` wrote (``predictions.jsonl`` may be absent)."""
        folder = Path(folder)
        report = json.loads((folder / REPORT).read_text(encoding="utf-8"))
        path = folder / PREDICTIONS
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []
        return cls(report, [Prediction(r["task"], r["dataset"], r["index"], r.get("output") or "", bool(r.get("truncated", False)),
                                       tuple(r["unit_scores"]) if isinstance(r.get("unit_scores"), list) else None,
                                       bool(r.get("looped", False))) for r in rows])
