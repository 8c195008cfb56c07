"""Throughput of parse + score over the test splits of all data sets in ../shared/data/uie.

Predictions are the rendered gold targets (so every output parses; the parser does its full work) in the
concise and full formats, scored in strict and InstructUIE-compatible modes.  Records/s counts records
parsed and scored; reading the data and rendering are timed separately.

    python bench/scorer.py [--out bench/results/scorer.md]
"""

from __future__ import annotations

import argparse
import time

from _common import markdown_table, require_shared_data, write_result

from prouie_pl.formats import render_target
from prouie_pl.reader import load_records
from prouie_pl.scoring import Scorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = require_shared_data()
    t0 = time.perf_counter()
    records = load_records(root, "test")
    t_load = time.perf_counter() - t0
    rows = []
    for fmt in ("concise", "full"):
        t0 = time.perf_counter()
        outputs = [render_target(r, fmt) for r in records]
        t_render = time.perf_counter() - t0
        for mode in ("strict", "instructuie"):
            times = []
            for _ in range(args.repeats):
                sc = Scorer(mode)
                t0 = time.perf_counter()
                for rec, out in zip(records, outputs):
                    sc.add(rec, out)
                report = sc.report()
                times.append(time.perf_counter() - t0)
            best = min(times)
            f1 = report["tasks"]["NER"]["average_f1"]
            rows.append([fmt, mode, len(records), best, len(records) / best, t_render, f1])
    body = markdown_table(["format", "mode", "records", "parse+score s (best of %d)" % args.repeats, "records/s", "render s", "NER avg F1"], rows)
    body += f"\n\nReading the 18 test splits took {t_load:.2f} s. Predictions are rendered gold targets, so F1 is 100 in strict mode."
    write_result("scorer.md", "Scorer throughput (parse + score, all 18 test splits)", body, args.out)


if __name__ == "__main__":
    main()
