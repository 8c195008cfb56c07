"""The loop guard (:class:`prouie_pl.decoding.LoopGuard`) on real answers: does it ever end a gold answer, and
what does it change in saved test predictions?

    python bench/loop_guard.py --predictions outputs/stage_ablation/gemma-3-270m/seed42/{cm,sa,de,mixed} \\
        --test-data outputs/stage_ablation/gemma-3-270m/data

1. Gold answers: every training record of ``--datasets`` (``--data``), rendered in the full and the concise
   format and tokenised with the model's tokenizer; the guard replays each one (``LoopGuard.first_loop``) and the
   table counts the answers it would have ended.  A guard that ends gold answers would cut right ones.
2. Saved predictions (``predictions.jsonl`` of a ``test`` run, decoded without the guard): each answer is
   tokenised again, the guard replayed, the answers it ends cut where it would have cut them, and the split
   scored both ways.  Re-tokenising decoded text can split a few words differently from the tokens the model
   wrote, so the step counts are close to, not exactly, what decoding would have saved.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import SHARED_DATA, markdown_table, write_result  # noqa: E402


def gold_table(tok, guard, data: Path, datasets: list[str], limit: int) -> list[list]:
    from prouie_pl.formats import render_target
    from prouie_pl.reader import load_records

    rows = []
    for ds in datasets:
        records = load_records(data, "train", datasets=[ds], max_records=limit)
        for fmt in ("full", "concise"):
            ids = [tok(render_target(r, fmt), add_special_tokens=False)["input_ids"] for r in records]
            fired = [i for i, t in enumerate(ids) if guard.first_loop(t) is not None]
            rows.append([ds, fmt, len(ids), round(sum(map(len, ids)) / max(1, len(ids)), 1), max(map(len, ids), default=0),
                         len(fired)])
    return rows


def prediction_rows(tok, guard, folder: Path, records) -> tuple[list, list]:
    """(row of the table, example lines) for one saved test run."""
    from prouie_pl.results import EvalResult

    lines = [json.loads(x) for x in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    by_key = {(r.task, r.dataset, r.index): r for r in records}
    plain, guarded, examples = [], [], []
    ended = ended_at_cap = saved = total = 0
    for p in lines:
        rec = by_key[(p["task"], p["dataset"], p["index"])]
        ids = tok(p["output"], add_special_tokens=False)["input_ids"]
        total += len(ids)
        hit = guard.first_loop(ids)
        plain.append((rec, p["output"], p.get("truncated", False)))
        if hit is None:
            guarded.append((rec, p["output"], p.get("truncated", False)))
            continue
        step, kept = hit
        ended += 1
        ended_at_cap += bool(p.get("truncated", False))
        saved += len(ids) - step
        text = tok.decode(ids[:kept], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        guarded.append((rec, text, True, None, True))
        if len(examples) < 2:
            examples.append(f"{folder.name} {rec.dataset} #{rec.index}: {len(ids)} tokens, ended at {step}, kept {kept}: "
                            f"`{text[-120:]}`")
    a, b = EvalResult.score(plain), EvalResult.score(guarded)
    row = [folder.name, len(lines), a.truncated, ended, ended_at_cap, saved, f"{100 * saved / max(1, total):.1f}",
           round(a.overall_f1, 2), round(b.overall_f1, 2), a.parse_failures, b.parse_failures]
    return row, examples


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma-3-270m", help="the tokenizer (a model name or folder)")
    ap.add_argument("--data", default=str(SHARED_DATA), help="gold training answers (IE INSTRUCTIONS layout)")
    ap.add_argument("--datasets", nargs="+", default=["NER/CoNLL2003", "RE/CoNLL2004", "EE/PHEE"])
    ap.add_argument("--max-gold", type=int, default=3000, help="training answers per data set (the first ones)")
    ap.add_argument("--predictions", nargs="*", default=[], help="folders with the predictions.jsonl of a test run")
    ap.add_argument("--test-data", default=None, help="the data root those predictions were decoded from (default --data)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from prouie_pl.decoding import LoopGuard
    from prouie_pl.modeling import load_tokenizer
    from prouie_pl.reader import load_records

    t0, guard = time.perf_counter(), LoopGuard()
    tok = load_tokenizer(args.model)
    gold = gold_table(tok, guard, Path(args.data), args.datasets, args.max_gold)
    body = [f"`python bench/loop_guard.py {' '.join(argv if argv is not None else sys.argv[1:])}`; guard "
            f"{guard}: a block of at most {guard.max_period} tokens written {guard.repeats} times in a row over at least "
            f"{guard.min_span} tokens.", "",
            "## Gold training answers", "",
            markdown_table(["data set", "format", "answers", "mean tokens", "max tokens", "the guard would end"], gold)]
    if args.predictions:
        records = load_records(args.test_data or args.data, "test", datasets=args.datasets)
        rows, examples = [], []
        for folder in args.predictions:
            row, ex = prediction_rows(tok, guard, Path(folder), records)
            rows.append(row)
            examples += ex
        body += ["", "## Saved test predictions, replayed", "",
                 markdown_table(["run", "answers", "cut (cap)", "guard ends", "of them at the cap", "tokens saved",
                                 "% of answer tokens", "F1 without", "F1 with", "parse failures without", "with"], rows),
                 "", "Examples (the last 120 characters the guard keeps):", ""] + [f"- {e}" for e in examples]
    body += ["", f"Took {time.perf_counter() - t0:.0f} s."]
    write_result(f"loop_guard_{Path(args.model).name}.md", "Loop guard on real answers", "\n".join(body), args.out, keep_notes=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
