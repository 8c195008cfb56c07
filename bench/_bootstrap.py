"""Bootstrap intervals of strict F1 over test sentences, for the benchmarks that score decoded test splits.

``per_sentence_counts`` gives every sentence's (tp, fp, fn) as the project's scorer counts them;
``resampled_f1`` turns resamples of sentence indices into micro F1 (draw the indices once and pass the same to
several arms for a paired comparison); ``percentile_interval`` reads the 95% interval off the draws.
"""

from __future__ import annotations

import json
from pathlib import Path

from prouie_pl.intervals import per_sentence_counts, percentile_interval, resampled_f1  # noqa: F401  (the benchmarks' names)


def read_predictions(folder, records) -> tuple[list, list[str]]:
    """The gold record and raw output of every line of ``folder/predictions.jsonl`` (``records``: the split's
    records, any order), in the file's order."""
    rows = [json.loads(line) for line in (Path(folder) / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    by_key = {(r.task, r.dataset, r.index): r for r in records}
    return [by_key[(p["task"], p["dataset"], p["index"])] for p in rows], [p["output"] for p in rows]
