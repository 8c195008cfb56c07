"""Unit scores on real data: are they calibrated, what does a threshold buy, and what do they cost?

    python bench/calibration.py --adapter outputs/gemma-3-270m/sft/adapter      # bench/results/calibration_gemma-3-270m.md
    python bench/calibration.py --adapter A --save                             # also writes A/confidence.json

An SFT adapter (concise format) decodes ``--dev`` dev and ``--test`` test sentences of NER/CoNLL2003,
RE/CoNLL2004 and EE/PHEE greedily with token log-probabilities (the base in float32).  Every unit of every answer
is scored three ways (:mod:`prouie_pl.confidence`: ``step_label``, ``step``, ``step_mean``) and marked correct
when it matches a gold unit not matched before it (the strict scorer's keys).  Then:

* **reliability** per task and split: units in ten equal-width score bins, mean score against the share correct,
  and the expected calibration error (ECE), for each scoring rule raw;
* **calibration**: a temperature per task (``p ** (1 / T)``) fitted on dev by log loss for each rule; the rule
  with the lowest dev log loss after calibration is the one saved (``--save``); test ECE after calibration;
* **threshold**: per task, the threshold chosen on dev (the highest dev precision whose dev recall keeps at
  least ``--keep-recall`` of the recall without a threshold), then test precision, recall and F1 at 0 and at it,
  and a sweep over fixed thresholds on test;
* **cost**: the same ``--timing`` test prompts decoded with and without log-probabilities, interleaved, and the
  time to score the answers, against the decoding time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import SHARED_DATA, markdown_table, write_result  # noqa: E402

DATASETS = ["NER/CoNLL2003", "RE/CoNLL2004", "EE/PHEE"]
SWEEP = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def load_split(data: str, split: str, n: int, seed: int):
    """``n`` sentences of each data set's ``split``: a seeded random sample (in file order), or the first ``n``
    when ``seed`` is negative.  The first sentences of a split come from a handful of documents (CoNLL2003's
    first hundred test sentences are mostly sports results), which a calibration fitted on them inherits."""
    import random

    from prouie_pl.reader import load_records

    if seed < 0:
        return load_records(data, split, datasets=DATASETS, max_records=n)
    records = load_records(data, split, datasets=DATASETS)
    out = []
    for ds in DATASETS:
        rows = [r for r in records if f"{r.task}/{r.dataset}" == ds]
        keep = sorted(random.Random(f"{seed}/{ds}/{split}").sample(range(len(rows)), min(n, len(rows))))
        out += [rows[i] for i in keep]
    return out


def decode(model, tok, records, max_new_tokens: int, batch_size: int, with_logprobs: bool = True):
    from prouie_pl.chat import chat_prompt_ids, stop_token_ids
    from prouie_pl.decoding import decode_prompts, greedy_output
    from prouie_pl.formats import build_prompt

    prompts = [chat_prompt_ids(tok, build_prompt(r, "concise")) for r in records]
    stops = stop_token_ids(tok, getattr(model, "generation_config", None))
    t0 = time.perf_counter()
    c = decode_prompts(model, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, stop_ids=stops,
                       pad_id=tok.pad_token_id, with_logprobs=with_logprobs)
    return greedy_output(tok, c), time.perf_counter() - t0


def scored_units(tok, records, out, methods):
    """Per record: (task, [(correct, {method: raw score})])."""
    from prouie_pl.confidence import score_answer, unit_correctness

    rows = []
    for k, rec in enumerate(records):
        per = {m: score_answer(tok, out.texts[k], out.token_ids[k], out.token_logprobs[k], rec.task, rec.schema, method=m)
               for m in methods}
        units = per[methods[0]].units
        ok = unit_correctness(rec, units)
        rows.append((rec, [(ok[i], {m: per[m].scores[i] for m in methods}) for i in range(len(units))]))
    return rows


def by_task(rows, method, calibration=None):
    out: dict[str, tuple[list, list]] = {}
    for rec, units in rows:
        s, c = out.setdefault(rec.task, ([], []))
        for ok, scores in units:
            s.append(calibration(rec.task, scores[method]) if calibration else scores[method])
            c.append(ok)
    return out


def prf(rows, method, threshold, cal=None):
    """Strict P/R/F1 per task keeping units scored above ``threshold`` (duplicates count as the scorer does not:
    here every unit is one prediction, so repeated units are false positives)."""
    from prouie_pl.schema import record_units

    res = {}
    for rec, units in rows:
        tp, fp, fn = res.setdefault(rec.task, [0, 0, 0]), None, None
        kept = [ok for ok, s in units if threshold <= 0 or (cal(rec.task, s[method]) if cal else s[method]) > threshold]
        n_gold = len(record_units(rec))
        t = sum(kept)
        tp[0] += t
        tp[1] += len(kept) - t
        tp[2] += n_gold - t
    out = {}
    for task, (tp, fp, fn) in res.items():
        p = 100 * tp / (tp + fp) if tp + fp else 0.0
        r = 100 * tp / (tp + fn) if tp + fn else 0.0
        out[task] = (p, r, 2 * p * r / (p + r) if p + r else 0.0, tp + fp)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True, help="an SFT adapter folder (concise format)")
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--dev", type=int, default=100, help="dev sentences per data set")
    ap.add_argument("--test", type=int, default=100, help="test sentences per data set")
    ap.add_argument("--timing", type=int, default=48, help="test prompts decoded with and without log-probabilities")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--keep-recall", type=float, default=0.85, help="dev recall share a chosen threshold must keep")
    ap.add_argument("--sample-seed", type=int, default=0, help="seed of the random sample of each split's sentences "
                    "(negative: the first sentences)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", action="store_true", help="write the fitted calibration to ADAPTER/confidence.json")
    ap.add_argument("--show", type=int, default=3, help="print this many test answers token by token (id, piece, probability)")
    ap.add_argument("--out", default=None, help="default bench/results/calibration_gemma-3-270m.md")
    args = ap.parse_args(argv)

    import torch

    from prouie_pl.confidence import SCORE_METHODS, Calibration, fit_temperature, log_loss, reliability
    from prouie_pl.extractor import Extractor

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    ex = Extractor.from_pretrained(args.adapter, device="cpu", dtype="float32", calibration=Calibration())
    model, tok = ex.model, ex.tokenizer
    splits = {"dev": load_split(args.data, "dev", args.dev, args.sample_seed),
              "test": load_split(args.data, "test", args.test, args.sample_seed)}
    methods = list(SCORE_METHODS)
    decoded, rows, seconds = {}, {}, {}
    for split, records in splits.items():
        out, dt = decode(model, tok, records, args.max_new_tokens, args.batch_size)
        decoded[split], seconds[split] = out, dt
        t0 = time.perf_counter()
        rows[split] = scored_units(tok, records, out, methods)
        seconds[split + "_scoring"] = (time.perf_counter() - t0) / len(methods)
        print(f"[calibration] {split}: {len(records)} sentences decoded in {dt:.0f} s", flush=True)

    shown = []
    for k in [i * len(splits["test"]) // max(1, args.show) for i in range(args.show)]:
        rec, out = splits["test"][k], decoded["test"]
        pieces = [f"{t}:{tok.convert_ids_to_tokens(t)!r}:{math.exp(lp):.3f}" for t, lp in zip(out.token_ids[k], out.token_logprobs[k])]
        units = rows["test"][k][1]
        shown.append(f"{rec.task}/{rec.dataset} #{rec.index}: {rec.sentence}\n  answer: {out.texts[k]}\n  tokens: {' '.join(pieces)}\n"
                     f"  unit scores ({methods[0]}): {[round(sc[methods[0]], 3) for _, sc in units]}; correct: {[ok for ok, _ in units]}")
    print("\n".join(shown), flush=True)
    tasks = sorted({rec.task for rec, _ in rows["dev"]})
    which = (f"the first {args.dev} dev and {args.test} test sentences of each" if args.sample_seed < 0 else
             f"{args.dev} dev and {args.test} test sentences of each, drawn at random (seed {args.sample_seed})")
    lines = [f"`python bench/calibration.py --adapter {args.adapter} --dev {args.dev} --test {args.test} --sample-seed "
             f"{args.sample_seed}` on {time.strftime('%Y-%m-%d')}, torch threads {args.threads}. Data: {', '.join(DATASETS)} "
             f"from `{args.data}`: {which}; greedy decoding, base in float32, at most "
             f"{args.max_new_tokens} new tokens."]

    # ---------------------------------------------------------------- calibration per rule and task
    temps: dict[str, dict[str, float]] = {}
    summary = []
    for m in methods:
        dev, test = by_task(rows["dev"], m), by_task(rows["test"], m)
        temps[m] = {t: fit_temperature(*dev[t]) for t in tasks if t in dev and dev[t][0]}
        for t in tasks:
            if t not in dev or t not in test:
                continue
            T = temps[m].get(t, 1.0)
            cal = Calibration(m, T)
            dev_cal = [cal.apply(p) for p in dev[t][0]]
            test_cal = [cal.apply(p) for p in test[t][0]]
            _, ece_dev_raw = reliability(*dev[t])
            _, ece_test_raw = reliability(*test[t])
            _, ece_test_cal = reliability(test_cal, test[t][1])
            summary.append([m, t, len(dev[t][0]), len(test[t][0]), f"{100 * sum(test[t][1]) / max(1, len(test[t][1])):.1f}",
                            f"{ece_dev_raw:.3f}", f"{ece_test_raw:.3f}", f"{T:.2f}", f"{log_loss(dev_cal, dev[t][1]):.3f}",
                            f"{ece_test_cal:.3f}"])
    dev_loss = {m: sum(log_loss([Calibration(m, temps[m].get(t, 1.0)).apply(p) for p in by_task(rows["dev"], m)[t][0]],
                                by_task(rows["dev"], m)[t][1]) * len(by_task(rows["dev"], m)[t][0]) for t in tasks
                       if t in by_task(rows["dev"], m)) for m in methods}
    best = min(methods, key=dev_loss.get)
    lines += ["", "## Calibration (ECE: expected calibration error over ten equal-width bins)", "",
              markdown_table(["rule", "task", "dev units", "test units", "test correct %", "dev ECE raw", "test ECE raw",
                              "T (fitted on dev)", "dev log loss calibrated", "test ECE calibrated"], summary),
              "", f"Rule with the lowest dev log loss after calibration: **{best}** (dev log loss summed over units: "
              + ", ".join(f"{m} {dev_loss[m]:.1f}" for m in methods) + ")."]

    cal_of = lambda task, p: Calibration(best, temps[best].get(task, 1.0)).apply(p)  # noqa: E731
    # ---------------------------------------------------------------- reliability tables (chosen rule, test)
    for t in tasks:
        raw = by_task(rows["test"], best).get(t)
        if not raw:
            continue
        table_raw, _ = reliability(*raw)
        table_cal, _ = reliability([cal_of(t, p) for p in raw[0]], raw[1])
        body = [[f"{b['low']:.1f}-{b['high']:.1f}", b["n"], "-" if b["mean_score"] is None else f"{b['mean_score']:.3f}",
                 "-" if b["accuracy"] is None else f"{b['accuracy']:.3f}", c["n"],
                 "-" if c["mean_score"] is None else f"{c['mean_score']:.3f}", "-" if c["accuracy"] is None else f"{c['accuracy']:.3f}"]
                for b, c in zip(table_raw, table_cal)]
        lines += ["", f"### Reliability, {t} test ({best})", "",
                  markdown_table(["score bin", "units raw", "mean score raw", "share correct raw", "units calibrated",
                                  "mean score calibrated", "share correct calibrated"], body)]

    # ---------------------------------------------------------------- thresholds
    base_dev = prf(rows["dev"], best, 0.0, cal_of)
    base_test = prf(rows["test"], best, 0.0, cal_of)
    grid = [i / 100 for i in range(1, 100)]
    chosen = {}
    for t in tasks:
        ok = [(prf(rows["dev"], best, th, cal_of)[t], th) for th in grid]
        ok = [(v, th) for v, th in ok if v[1] >= args.keep_recall * base_dev[t][1] and v[3] > 0]
        chosen[t] = max(ok, key=lambda x: (x[0][0], -x[1]))[1] if ok else 0.0
    trow = []
    for t in tasks:
        at = prf(rows["test"], best, chosen[t], cal_of)[t]
        b = base_test[t]
        trow.append([t, f"{chosen[t]:.2f}", f"{b[0]:.1f}", f"{b[1]:.1f}", f"{b[2]:.1f}", f"{at[0]:.1f}", f"{at[1]:.1f}", f"{at[2]:.1f}",
                     f"{at[0] - b[0]:+.1f}", f"{100 * at[1] / b[1]:.0f}%" if b[1] else "-"])
    lines += ["", f"## Threshold chosen on dev (highest dev precision keeping {args.keep_recall:.0%} of dev recall), scored on test", "",
              "Strict P/R/F1 over units (every unit one prediction), calibrated scores.", "",
              markdown_table(["task", "threshold", "P at 0", "R at 0", "F1 at 0", "P", "R", "F1", "precision gain", "recall kept"], trow)]
    sweep = []
    for th in SWEEP:
        v = prf(rows["test"], best, th, cal_of)
        sweep.append([f"{th:.2f}"] + [f"{v[t][0]:.1f} / {v[t][1]:.1f} / {v[t][2]:.1f}" if t in v else "-" for t in tasks])
    lines += ["", "### Test sweep (calibrated scores; P / R / F1)", "", markdown_table(["threshold"] + tasks, sweep)]

    # ---------------------------------------------------------------- cost
    timing = splits["test"][:args.timing]
    plain, logp = [], []
    for rep in range(2):
        for flag in ((False, True) if rep % 2 == 0 else (True, False)):
            _, dt = decode(model, tok, timing, args.max_new_tokens, args.batch_size, with_logprobs=flag)
            (logp if flag else plain).append(dt)
    out_t, _ = decode(model, tok, timing, args.max_new_tokens, args.batch_size)
    t0 = time.perf_counter()
    scored_units(tok, timing, out_t, [best])
    score_s = time.perf_counter() - t0
    p_med, l_med = statistics.median(plain), statistics.median(logp)
    lines += ["", f"## Cost ({len(timing)} test prompts, two interleaved runs each, median)", "",
              markdown_table(["decoding without log-probs s", "with log-probs s", "ratio", "scoring the answers s",
                              "(with + scoring) / without"],
                             [[f"{p_med:.2f}", f"{l_med:.2f}", f"{l_med / p_med:.3f}", f"{score_s:.3f}", f"{(l_med + score_s) / p_med:.3f}"]])]
    lines += ["", "## Answers token by token (id:piece:probability)", "", "```", *shown, "```"]
    lines += ["", f"This invocation took {(time.perf_counter() - t_start) / 60:.1f} min."]

    result = {"rule": best, "temperatures": temps, "thresholds": chosen, "tasks": tasks}
    if args.save:
        cal = Calibration(best, 1.0, f"dev: {', '.join(DATASETS)} ({args.dev} each)", sum(len(u) for _, u in rows["dev"]),
                          dict(temps[best]))
        print(f"wrote {cal.save(args.adapter)}")
    out = args.out or None
    path = write_result("calibration_gemma-3-270m.md", "Unit scores: calibration, threshold and cost (gemma-3-270m, CPU)",
                        "\n".join(lines), out, keep_notes=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
