"""Stratified sampling for the Streamlined Alignment stage (and the prompts of Deep Exploration).

A subset of N records (or a fraction) per data set, stratified by number of structural units: records are
binned by how many units their gold answer has (0, 1, 2, 3, 4-5, 6+), each bin keeps its share of the sample
(largest-remainder rounding), and records are drawn at random within bins.  Seeded: the same seed gives the
same subset.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Optional, Sequence

from ..schema import Record, count_units

_BINS = (0, 1, 2, 3, 4, 6)


def unit_bin(units: int) -> int:
    """The bin of a record with ``units`` structural units."""
    n = units
    for i in range(len(_BINS) - 1, -1, -1):
        if n >= _BINS[i]:
            return i
    return 0


def stratified_indices(groups: Sequence, units: Sequence[int], per_dataset: Optional[int] = None,
                       fraction: Optional[float] = None, seed: int = 0) -> list[int]:
    """Positions of the sample, in their original order: ``groups[i]`` is row i's ``(task, data set)`` and
    ``units[i]`` its number of structural units.  Exactly one of ``per_dataset`` / ``fraction``."""
    if (per_dataset is None) == (fraction is None):
        raise ValueError("give exactly one of data.sample_per_dataset and data.sample_fraction")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.sample_fraction must lie in (0, 1], not {fraction}")
    if per_dataset is not None and per_dataset < 1:
        raise ValueError(f"data.sample_per_dataset must be >= 1, not {per_dataset}")
    by_ds: dict = defaultdict(list)
    for i, g in enumerate(groups):
        by_ds[tuple(g)].append(i)
    out: list[int] = []
    for (task, ds), rows in by_ds.items():
        n = per_dataset if per_dataset is not None else max(1, round(fraction * len(rows)))
        if n > len(rows):
            raise ValueError(
                f"data.sample_per_dataset={n} is larger than the {len(rows)} training records of {task}/{ds}; "
                "lower it, use data.sample_fraction, or add data"
            )
        rng = random.Random(f"{seed}/{task}/{ds}")
        bins: dict[int, list[int]] = defaultdict(list)
        for i in rows:
            bins[unit_bin(units[i])].append(i)
        quotas = {b: n * len(v) / len(rows) for b, v in bins.items()}
        take = {b: int(q) for b, q in quotas.items()}
        left = n - sum(take.values())
        for b in sorted(quotas, key=lambda b: (-(quotas[b] - take[b]), b))[:left]:
            take[b] += 1
        for b in sorted(bins):
            out.extend(rng.sample(bins[b], take[b]))
    return sorted(out)


def stratified_sample(records: Sequence[Record], per_dataset: Optional[int] = None, fraction: Optional[float] = None,
                      seed: int = 0) -> list[Record]:
    """Sample per data set, stratified by unit-count bin.  Exactly one of ``per_dataset`` / ``fraction``."""
    idx = stratified_indices([(r.task, r.dataset) for r in records], [count_units(r) for r in records], per_dataset, fraction, seed)
    return [records[i] for i in idx]
