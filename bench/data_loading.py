"""Loading and tokenising the training data: the Arrow path (``datasets``, cached) against the in-memory path.

    python bench/data_loading.py                 # all 18 shared training splits, Gemma 3 270M tokenizer
    python bench/data_loading.py --model tiny    # the same with the tiny model's tokenizer

Each measurement runs in a fresh process (so peak RSS is its own) and times what a CM stage does before its
first batch: read and validate every training split, then build prompt + full-format target token ids for every
record (``max_seq_length`` of the model's CM config).

* ``in-memory``: ``reader.load_records`` and ``encode_sft`` per record, everything in Python lists (what every
  start did before the Arrow path).
* ``arrow, first start``: ``UIEDataModule`` with an empty ``datasets`` cache: validation writes the rows and
  ``Dataset.map`` the token ids as Arrow files.
* ``arrow, cached start``: the same command again: both are found by fingerprint and memory-mapped.

Tokenizer loading is timed apart and left out of the ``data s`` column (it is the same on every path).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, markdown_table, require_shared_data, write_result

MODES = ("in-memory", "arrow-first", "arrow-cached")
LABEL = {"in-memory": "in-memory (reader + encode_sft)", "arrow-first": "arrow, first start (empty cache)",
         "arrow-cached": "arrow, cached start"}


def max_seq_length(model: str) -> int:
    import yaml

    folder = REPO / "configs" / model
    path = next(p for p in (folder / "cm.yaml", folder / "cm_cpu.yaml") if p.is_file())
    return int(yaml.safe_load(path.read_text())["data"].get("max_seq_length", 1024))


def worker(mode: str, model: str, data: str, cache: str, length: int, num_proc) -> dict:
    from prouie_pl.modeling import load_tokenizer

    t0 = time.perf_counter()
    tok = load_tokenizer(model)
    t1 = time.perf_counter()
    if mode == "in-memory":
        from prouie_pl.datamodules.batching import encode_sft
        from prouie_pl.formats import example
        from prouie_pl.reader import load_records

        records = load_records(data, "train")
        encoded = [encode_sft(tok, *example(r, "full"), length) for r in records]
        n, tokens = len(records), sum(len(e.input_ids) for e in encoded if e)
    else:
        from prouie_pl.datamodules import UIEDataModule

        dm = UIEDataModule(data_dir=data, stage="cm", max_seq_length=length, cache_dir=cache, num_proc=num_proc, max_val_records=0)
        dm.connect(tok)
        dm.setup("fit")
        table, dropped, _ = dm.encoded(0)
        n, tokens = len(table), sum(table["length"])
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"records": n, "tokens": tokens, "tokenizer_s": t1 - t0, "data_s": t2 - t1, "peak_rss_mb": peak}


def run_worker(args, mode: str, cache: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--model", args.model, "--data", args.data, "--cache", cache,
           "--max-seq-length", str(args.length)] + (["--num-proc", str(args.num_proc)] if args.num_proc else [])
    env = {**os.environ, "HF_DATASETS_CACHE": cache, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--data", default=None)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the three modes, interleaved")
    ap.add_argument("--num-proc", type=int, default=None, help="processes for Dataset.map on the first start")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--max-seq-length", dest="length", type=int, default=None)
    args = ap.parse_args(argv)
    args.data = args.data or str(require_shared_data())
    args.length = args.length or max_seq_length(args.model)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.data, args.cache, args.length, args.num_proc)))
        return 0
    results = {m: [] for m in MODES}
    for _ in range(args.repeats):
        cache = tempfile.mkdtemp(prefix="prouie_data_cache_")
        try:
            for mode in MODES:  # arrow-cached right after arrow-first, in the same cache
                results[mode].append(run_worker(args, mode, cache))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    base = statistics.median(r["data_s"] for r in results["in-memory"])
    rows = []
    for mode in MODES:
        rs = results[mode]
        med = statistics.median(r["data_s"] for r in rs)
        rows.append([LABEL[mode], rs[0]["records"], f"{rs[0]['tokens']:,}", f"{med:.1f}", " / ".join(f"{r['data_s']:.1f}" for r in rs),
                     f"{base / med:.2f}", f"{statistics.median(r['peak_rss_mb'] for r in rs):,.0f}",
                     f"{statistics.median(r['tokenizer_s'] for r in rs):.1f}"])
    body = (f"`python bench/data_loading.py {' '.join(argv if argv is not None else sys.argv[1:])}` on {time.strftime('%Y-%m-%d')}: "
            f"every training split under `{args.data}`, CM stage (full format, max_seq_length {args.length}), tokenizer of "
            f"`{args.model}`, {args.repeats} interleaved rounds, each measurement a fresh process; `data s` is the median "
            f"(every round after the slash), `speed-up` is against the in-memory path"
            + (f"; `Dataset.map` with num_proc {args.num_proc}" if args.num_proc else "") + ".\n\n"
            + markdown_table(["path", "records", "tokens", "data s", "rounds", "speed-up", "peak RSS MB", "tokenizer s"], rows))
    write_result(f"data_loading_{Path(args.model).name}.md", "Loading and tokenising the training data", body, args.out, keep_notes=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
