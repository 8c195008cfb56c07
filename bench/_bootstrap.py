"""Bootstrap intervals of strict F1 over test sentences, for the benchmarks that score decoded test splits.

``per_sentence_counts`` gives every sentence's (tp, fp, fn) as the project's scorer counts them;
``resampled_f1`` turns resamples of sentence indices into micro F1 (draw the indices once and pass the same to
several arms for a paired comparison); ``percentile_interval`` reads the 95% interval off the draws.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_predictions(folder, records) -> tuple[list, list[str]]:
    """The gold record and raw output of every line of ``folder/predictions.jsonl`` (``records``: the split's
    records, any order), in the file's order."""
    rows = [json.loads(line) for line in (Path(folder) / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    by_key = {(r.task, r.dataset, r.index): r for r in records}
    return [by_key[(p["task"], p["dataset"], p["index"])] for p in rows], [p["output"] for p in rows]


def per_sentence_counts(records, outputs) -> dict[tuple[str, str], list[tuple[int, int, int]]]:
    """(tp, fp, fn) of every sentence, per (data set, metric), as the strict scorer counts them."""
    from prouie_pl.scoring import TASK_METRICS, Scorer

    out: dict = {}
    for rec, text in zip(records, outputs):
        scorer = Scorer("strict")
        scorer.add(rec, text)
        for metric in TASK_METRICS[rec.task]:
            c = scorer.counts[metric][rec.dataset]
            out.setdefault((rec.dataset, metric), []).append((c.tp, c.fp, c.fn))
    return out


def resampled_f1(counts, idx):
    """Micro F1 (percent) of each resample of the sentences, by :func:`prouie_pl.scoring.precision_recall_f1`.

    ``counts``: ``[sentences, 3]`` (tp, fp, fn), or ``[runs, sentences, 3]`` for the mean F1 over runs (training
    seeds); ``idx``: ``[resamples, sentences]`` sentence indices.  Returns ``[resamples]``.
    """
    import numpy as np

    from prouie_pl.scoring import precision_recall_f1

    c = np.asarray(counts, dtype=float)
    c = c[None] if c.ndim == 2 else c
    tot = c[:, idx].sum(axis=2)  # [runs, resamples, 3]
    return precision_recall_f1(tot[..., 0], tot[..., 1], tot[..., 2])[2].mean(axis=0)


def percentile_interval(draws) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap draws."""
    import numpy as np

    lo, hi = np.percentile(np.asarray(draws, dtype=float), [2.5, 97.5])
    return float(lo), float(hi)
