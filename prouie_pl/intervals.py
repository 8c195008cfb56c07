"""Bootstrap intervals of strict F1 over test sentences: per stage, and paired between stages.

Every test sentence contributes its own (tp, fp, fn) per (data set, metric), as the strict scorer counts them
(:func:`per_sentence_counts`).  A resample draws the sentences of each data set with replacement; F1 is
recomputed from the summed counts, averaged over data sets per metric and over tasks for ``overall``, exactly
as :func:`prouie_pl.scoring.overall_f1` averages.  The same draws serve every stage, so the difference between
two stages is paired: its interval shows whether one stage beat the other on these sentences, not only
whether their own intervals overlap.  The intervals are over test sentences only; a second training run
would add its own spread.
"""

from __future__ import annotations

from typing import Optional, Sequence

OVERALL = ("overall", "")


def per_sentence_counts(records, outputs) -> dict[tuple[str, str], list[tuple[int, int, int]]]:
    """(tp, fp, fn) of every sentence, per (data set, metric), as the strict scorer counts them, in the order of
    ``records`` (``outputs``: the raw answer of each)."""
    from .scoring import TASK_METRICS, Scorer

    out: dict = {}
    for rec, text in zip(records, outputs):
        scorer = Scorer("strict")
        scorer.add(rec, text)
        for metric in TASK_METRICS[rec.task]:
            c = scorer.counts[metric][rec.dataset]
            out.setdefault((rec.dataset, metric), []).append((c.tp, c.fp, c.fn))
    return out


def resampled_f1(counts, idx):
    """Micro F1 (percent) of each resample of the sentences.

    ``counts``: ``[sentences, 3]`` (tp, fp, fn), or ``[runs, sentences, 3]`` for the mean F1 over runs (training
    seeds); ``idx``: ``[resamples, sentences]`` sentence indices.  Returns ``[resamples]``.
    """
    import numpy as np

    from .scoring import precision_recall_f1

    c = np.asarray(counts, dtype=float)
    c = c[None] if c.ndim == 2 else c
    tot = c[:, idx].sum(axis=2)  # [runs, resamples, 3]
    return precision_recall_f1(tot[..., 0], tot[..., 1], tot[..., 2])[2].mean(axis=0)


def percentile_interval(draws) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap draws."""
    import numpy as np

    lo, hi = np.percentile(np.asarray(draws, dtype=float), [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_draws(counts: dict[str, dict], n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """F1 of ``n_boot`` paired resamples per arm and (data set, metric), per ``("average", metric)`` (the mean
over data sets) and ``OVERALL``.

    ``counts``: arm -> :func:`per_sentence_counts` (every arm over the same sentences in the same order).
    """
    import numpy as np

    from .scoring import overall_f1

    if not counts:
        return {}
    first = next(iter(counts.values()))
    sizes: dict[str, int] = {}
    for (ds, _), v in first.items():
        sizes[ds] = len(v)
    for arm, c in counts.items():
        for (ds, m), v in c.items():
            if len(v) != sizes.get(ds, -1):
                raise ValueError(f"{arm}: {len(v)} sentences of {ds} ({m}) against {sizes.get(ds)} in the first arm; "
                                 "paired intervals need the same test sentences in every arm")
    rng = np.random.default_rng(seed)
    idx = {ds: rng.integers(0, n, (n_boot, n)) for ds, n in sorted(sizes.items())}
    out = {}
    for arm, c in counts.items():
        f1 = {k: resampled_f1(v, idx[k[0]]) for k, v in c.items()}
        averages = {("average", m): np.mean([v for (_, mm), v in f1.items() if mm == m], axis=0) for m in {m for _, m in f1}}
        f1[OVERALL] = overall_f1({"tasks": {m: {"average_f1": v} for (_, m), v in averages.items()}})
        out[arm] = {**f1, **averages}
    return out


def stage_intervals(counts: dict[str, dict], n_boot: int = 1000, seed: int = 0,
                    pairs: Optional[Sequence[tuple[str, str]]] = None) -> dict:
    """Intervals of each arm's F1 and of the paired differences ``(arm, reference)`` in ``pairs`` (default: each
    arm against the one before it).  Returns ``{"arms": {arm: {key: (lo, hi)}}, "differences": {(arm, ref):
    {key: (lo, hi)}}}`` with keys ``(data set, metric)`` and ``OVERALL``."""
    draws = bootstrap_draws(counts, n_boot, seed)
    arms = list(draws)
    pairs = list(pairs) if pairs is not None else list(zip(arms[1:], arms[:-1]))
    return {
        "arms": {a: {k: percentile_interval(v) for k, v in d.items()} for a, d in draws.items()},
        "differences": {(a, r): {k: percentile_interval(v - draws[r][k]) for k, v in draws[a].items() if k in draws[r]}
                        for a, r in pairs},
    }


def counts_to_json(counts: dict) -> dict:
    """:func:`per_sentence_counts` as JSON (``"data set|metric"`` keys)."""
    return {f"{ds}|{m}": [list(c) for c in v] for (ds, m), v in counts.items()}


def counts_from_json(obj: dict) -> dict:
    return {tuple(k.split("|", 1)): [tuple(c) for c in v] for k, v in obj.items()}
