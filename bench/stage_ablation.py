"""Stage ablation: does each ProUIE stage add to the one before, and does the whole beat plain SFT at equal compute?

    python bench/stage_ablation.py --model gemma-3-270m    # bench/results/stage_ablation_gemma-3-270m.md (~3 h on 2 cores)
    python bench/stage_ablation.py --model gemma-3-270m --stop-after CM+SA+DE   # the chain alone (~2 h); run again for mixed
    python bench/stage_ablation.py --model tiny --quick    # smoke run, a few minutes, results in the work folder

One chain of stages, each started from the adapter of the one before and each scored on the test split:

    CM        curriculum SFT NER -> NER+RE -> NER+RE+EE (cumulative), full format, 6 x ``--cm-unit`` steps
              (``trainer.limit_train_batches``: a unit of optimizer steps, counted in micro-batches;
              ``data.epochs_per_phase: [1, 2, 3]``), a dev check every two units (the dev F1 curve shows whether CM
              has flattened)
    CM+SA     SA from the CM adapter: a stratified sample (``--sa-per-dataset``), concise format, ``--sa-epochs``
    CM+SA+DE  DE from the CM+SA adapter: ``--de-steps`` GRPO steps with stepwise rewards
    mixed     SFT on every task shuffled together, concise format, for the seconds CM + SA + DE trained
              (``trainer.max_time``; validation time excluded), its cosine schedule running on that clock

so CM+SA against CM asks what SA adds, CM+SA+DE against CM+SA what DE adds, and CM+SA+DE against mixed whether
the three stages beat plain SFT at the same training time.  Every SFT stage decays to its floor (a stage cut by
``max_time`` follows the clock); DE's learning rate is constant after warm-up.

Data: a seeded sample of ``--train`` training sentences per data set (one pool for every arm), a seeded dev sample
of ``--dev`` (CM's dev checks; nothing reads the test split before the end), the first ``--test`` test sentences.
Each stage runs through ``prouie_pl.pipeline.run_stage``: the frozen base trains in the dtype its config names
(SFT: ``auto``, bf16 on a CPU with AVX512-BF16; DE, nearly all sampling: float32) and is cast to float32 for
greedy test decoding.  Intervals come from a paired bootstrap: test sentences resampled within each data set,
the same draws for every arm.  Finished stages in ``--work-dir`` are reused on a rerun, and the results file is
rewritten after every arm, so an interrupted run still reports the arms it finished.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _bootstrap import per_sentence_counts, percentile_interval, read_predictions, resampled_f1  # noqa: E402
from _common import REPO, RESULTS, SHARED_DATA, markdown_table, write_result  # noqa: E402

ARMS = ("CM", "CM+SA", "CM+SA+DE", "mixed")
# (arm, reference): the comparisons the paper's question asks for
COMPARISONS = (("CM+SA", "CM"), ("CM+SA+DE", "CM+SA"), ("CM+SA+DE", "CM"), ("CM+SA+DE", "mixed"))
HEADLINE = ("NER", "RE_strict", "EE_trigger", "EE_argument")
CONFIG_OF = {"mixed": "cm", "cm": "cm", "sa": "sa", "de": "de"}
PRESETS = {  # full run / --quick
    "cm_unit": (50, 1), "sa_epochs": (2, 1), "de_steps": (30, 2), "train": (300, 32), "dev": (16, 3), "test": (200, 6),
    "sa_per_dataset": (300, 8), "max_new_tokens_full": (352, 48), "max_new_tokens_concise": (160, 32), "threads": (2, 1)}
CALLBACKS = [{"class_path": "prouie_pl.callbacks.AdapterExport", "init_args": {"monitor": None}},
             {"class_path": "prouie_pl.callbacks.GenerationEvaluator", "init_args": {"sample_rows": 0}},
             {"class_path": "prouie_pl.callbacks.CurriculumCallback"}]


@dataclass(frozen=True)
class Stage:
    name: str                    # folder under the seed's folder
    kind: str                    # mixed | cm | sa | de
    arm: str                     # the arm whose score its test decoding gives
    after: Optional[str] = None  # the stage whose adapter it starts from


STAGES = (Stage("cm", "cm", "CM"), Stage("sa", "sa", "CM+SA", "cm"), Stage("de", "de", "CM+SA+DE", "sa"),
          Stage("mixed", "mixed", "mixed"))


def config_path(model: str, kind: str) -> Path:
    folder, name = REPO / "configs" / model, CONFIG_OF[kind]
    path = next((p for p in (folder / f"{name}_cpu.yaml", folder / f"{name}.yaml") if p.is_file()), None)
    if path is None:
        raise SystemExit(f"--model {model}: no {name}_cpu.yaml or {name}.yaml under {folder}")
    return path


def accumulation(model: str, kind: str) -> int:
    """``trainer.accumulate_grad_batches`` of a stage's config (1 when it sets none): a curriculum unit counts
    optimizer steps, ``limit_train_batches`` counts micro-batches."""
    import yaml

    config = yaml.safe_load(config_path(model, kind).read_text()) or {}
    return int((config.get("trainer") or {}).get("accumulate_grad_batches") or 1)


def stage_options(s: Stage, args, seed: int, mixed_seconds: Optional[float] = None) -> dict:
    """Command-line overrides of one stage (on top of its config)."""
    folder = args.root / s.name
    o = {"seed_everything": seed, "data.seed": seed, "data.data_dir": str(args.data_dir), "data.datasets": args.datasets,
         "data.max_train_records": args.train, "data.max_val_records": 0, "data.max_test_records": args.test,
         "trainer.enable_progress_bar": False, "trainer.enable_checkpointing": False, "trainer.limit_val_batches": 0,
         "trainer.callbacks": CALLBACKS, "trainer.max_time": None,
         "trainer.logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(folder)}},
         "model.init_args.lora.init_adapter": "null",  # run_stage sets the previous stage's adapter after this
         "model.init_args.generation.max_new_tokens": args.max_new_tokens_full if s.kind == "cm" else args.max_new_tokens_concise}
    if s.kind == "cm":
        o.update({"data.schedule": "cumulative", "data.epochs_per_phase": list(range(1, args.n_tasks + 1)),
                  "trainer.max_epochs": args.n_tasks * (args.n_tasks + 1) // 2, "trainer.max_steps": -1,
                  "trainer.limit_train_batches": args.cm_unit * accumulation(args.model, "cm"), "data.max_val_records": args.dev,
                  "trainer.limit_val_batches": 1.0, "trainer.check_val_every_n_epoch": 2,
                  "trainer.num_sanity_val_steps": 0})
    elif s.kind == "sa":
        o.update({"data.sample_per_dataset": args.sa_per_dataset, "trainer.max_epochs": args.sa_epochs, "trainer.max_steps": -1,
                  "data.target_format": args.concise_format})
    elif s.kind == "de":
        o.update({"data.sample_per_dataset": min(args.train, 64), "trainer.max_steps": args.de_steps, "trainer.max_epochs": -1,
                  "data.target_format": args.concise_format,
                  "trainer.val_check_interval": None, "trainer.check_val_every_n_epoch": None})
    else:
        seconds = max(1, int(round(mixed_seconds)))
        o.update({"data.schedule": "mixed", "data.epochs_per_phase": 1, "data.target_format": args.concise_format,
                  "trainer.max_time": f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}",
                  "trainer.max_epochs": -1, "trainer.max_steps": 100_000})
    return o


def train_stage(s: Stage, args, seed: int, mixed_seconds: Optional[float] = None) -> dict:
    """One stage through ``run_stage`` (fit, then greedy decoding of the test sentences with the base in
    float32); its ``stage.json`` is reused on a rerun."""
    from prouie_pl.pipeline import DONE, run_stage

    folder = args.root / s.name
    if not (folder / DONE).is_file():
        print(f"[stage_ablation] seed {seed}: {s.name}" + (f" for {mixed_seconds:.0f} s" if mixed_seconds else ""), flush=True)
        run_stage(s.kind, str(config_path(args.model, s.kind)), folder, str(args.root / s.after / "adapter") if s.after else None,
                  stage_options(s, args, seed, mixed_seconds), "last", test_dtype="float32")
        gc.collect()  # frees the model before the next stage loads its own
    return json.loads((folder / DONE).read_text())


def trained_seconds(info: dict) -> float:
    """Training seconds of a stage: its fit time without validation decoding."""
    cost = info["cost"]
    return cost["seconds"] - cost.get("validation_seconds", 0.0)


def dev_curve(folder: Path) -> list[tuple[int, float]]:
    """(step, dev F1) of every validation a stage logged (CSV logger)."""
    rows = []
    for path in sorted(folder.glob("lightning_logs/*/metrics.csv")):
        with path.open() as f:
            rows += [(int(r["step"]), float(r["val/f1"])) for r in csv.DictReader(f) if r.get("val/f1")]
    return rows


def answer_shapes(folder: Path) -> dict:
    """Counts over a stage's test predictions: all, empty (``{}`` or blank) and cut at the token cap."""
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    empty = sum(1 for r in rows if r["output"].strip() in ("", "{}"))
    cut = sum(1 for r in rows if r.get("truncated"))
    return {"n": len(rows), "empty": empty, "truncated": cut}


def gold_empty(records) -> int:
    from prouie_pl.schema import count_units

    return sum(1 for r in records if count_units(r) == 0)


def write_subset(src: Path, dst: Path, datasets: list[str], n_train: int, n_test: int, seed: int, n_dev: int = 16) -> None:
    """Seeded train and dev samples and the first ``n_test`` test sentences per data set, same layout."""
    from prouie_pl.reader import discover, write_dataset

    for info in discover(src, datasets=datasets):
        splits = {}
        for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
            rows = json.loads((info.path / f"{split}.json").read_text(encoding="utf-8"))
            keep = range(min(n, len(rows))) if split == "test" else \
                sorted(random.Random(f"{seed}/{info.id}/{split}").sample(range(len(rows)), min(n, len(rows))))
            splits[split] = [rows[i] for i in keep]
        write_dataset(dst, info.task, info.name, json.loads((info.path / "labels.json").read_text(encoding="utf-8")), splits)


def paired_differences(counts: dict[str, list[dict]], ref: str, n_boot: int, seed: int = 0) -> dict:
    """95% intervals of (arm - ``ref``) F1 per (data set, metric) and ``("overall", "")``.

    ``counts``: arm -> one :func:`per_sentence_counts` per training seed, sentences in the same order in every
    arm.  One set of resamples per data set serves every arm, metric and seed; seeds are averaged per draw.
    """
    import numpy as np

    from prouie_pl.scoring import overall_f1

    rng = np.random.default_rng(seed)  # the same seed draws the same resamples for every reference
    sizes = {ds: len(v) for (ds, _), v in counts[ref][0].items()}
    idx = {ds: rng.integers(0, n, (n_boot, n)) for ds, n in sizes.items()}

    def draws(arm):
        f1 = {k: resampled_f1([c[k] for c in counts[arm]], idx[k[0]]) for k in counts[ref][0]}
        metrics = {m for _, m in f1}
        f1[("overall", "")] = overall_f1({"tasks": {m: {"average_f1": np.mean([v for (_, mm), v in f1.items() if mm == m], axis=0)}
                                                    for m in metrics}})
        return f1

    base = draws(ref)
    return {arm: {k: percentile_interval(v - base[k]) for k, v in draws(arm).items()} for arm in counts if arm != ref}


def headline(report: dict) -> dict[tuple[str, str], float]:
    from prouie_pl.scoring import overall_f1

    t = report["tasks"]
    cells = {(ds, m): t[m]["datasets"][ds]["f1"] for m in HEADLINE if m in t for ds in t[m]["datasets"]}
    return {**cells, ("overall", ""): overall_f1(report)}




def score_tables(args, arms: dict, diffs: dict, n_gold_empty: int) -> str:
    from prouie_pl.scoring import parse_failures

    done = [a for a in ARMS if a in arms]
    cells = {a: headline(arms[a]["report"]) for a in done}
    keys = list(cells[done[0]])
    names = [f"{m} {ds}" if m else ds for ds, m in keys]
    f1_rows = [[a] + [f"{cells[a][k]:.1f}" for k in keys]
               + [parse_failures(arms[a]["report"]), f"{arms[a]['shapes']['empty']} ({n_gold_empty})", arms[a]["shapes"]["truncated"]]
               for a in done]
    diff_rows = [[f"{a} - {ref}"] + [f"{cells[a][k] - cells[ref][k]:+.1f} [{diffs[(a, ref)][k][0]:+.1f}, {diffs[(a, ref)][k][1]:+.1f}]"
                                     for k in keys] for a, ref in COMPARISONS if (a, ref) in diffs]
    n = arms[done[0]]["shapes"]["n"]
    return "\n".join([
        f"## Test F1 (strict, %; {n} test sentences)", "",
        markdown_table(["arm"] + names + ["parse failures", "`{}` or blank (gold empty)", "hit the token cap"], f1_rows), "",
        f"## Differences (F1 points, 95% paired bootstrap interval, {args.bootstrap} resamples)", "",
        markdown_table(["comparison"] + names, diff_rows)])


def cost_tables(stages: dict, curve: list, mixed_budget: Optional[float] = None) -> str:
    rows = []
    for s in STAGES:
        if s.name not in stages:
            continue
        info = stages[s.name]
        c = info["cost"]
        kind = "SFT" if s.kind == "mixed" else s.kind.upper()
        rows.append([s.arm, kind, c["steps"], f"{trained_seconds(info):.0f}", f"{c.get('validation_seconds', 0):.0f}",
                     f"{trained_seconds(info) / max(c['steps'], 1):.2f}", f"{c['tokens']:,}" if c["tokens"] else "-",
                     c["completions"] or "-", f"{info['test_seconds']:.0f}"])
    chain = sum(trained_seconds(stages[s.name]) for s in STAGES[:3] if s.name in stages)
    curve_text = ", ".join(f"step {step}: {f1:.1f}" for step, f1 in curve) or "none logged"
    return "\n".join([
        "## Cost", "",
        markdown_table(["arm (stage)", "stage", "steps", "trained s", "dev-check s", "s a step", "SFT tokens", "GRPO completions",
                        "test-decoding s"], rows), "",
        f"CM + SA + DE trained {chain:.0f} s (dev checks excluded); mixed SFT gets "
        + (f"{mixed_budget:.0f} s as its `max_time` (`--mixed-seconds`: see the notes for how it was estimated)."
           if mixed_budget else "that as its `max_time`."), "",
        f"CM's dev F1 (overall, on the dev sample; steps as logged): {curve_text}."])


def setup_text(args, argv, total_s) -> str:
    seeds = ", ".join(map(str, args.seeds))
    steps_cm = 6 * args.cm_unit if args.n_tasks == 3 else args.cm_unit * args.n_tasks * (args.n_tasks + 1) // 2
    return (
        f"`python bench/stage_ablation.py {' '.join(argv)}` on {time.strftime('%Y-%m-%d')}, torch threads {args.threads}, "
        + (f"one training seed ({seeds}): the intervals show test-sentence noise only, not the spread between training runs."
           if len(args.seeds) == 1 else f"training seeds {seeds}: F1 cells are those of the first seed.")
        + f"\n\nData: {', '.join(args.datasets)} from `{args.data}`: {args.train} training sentences per data set (seed "
        f"{args.data_seed}), {args.dev} dev sentences per data set (CM's dev checks), the first {args.test} test sentences. "
        f"CM: {steps_cm} steps (curriculum unit {args.cm_unit} steps: NER, then NER+RE for two units, then all three); SA: "
        f"{args.sa_epochs} epoch(s) over a stratified sample of {args.sa_per_dataset} per data set; DE: {args.de_steps} GRPO "
        f"steps; mixed SFT: the chain's training seconds.  Greedy test decoding with the base in float32, at most "
        f"{args.max_new_tokens_full} (full) / {args.max_new_tokens_concise} (concise) new tokens.  This invocation took "
        f"{total_s / 60:.1f} min.")


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma-3-270m", help="a folder of configs/ (its cm, sa and de configs are used)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny budget and data")
    for k, (full, quick) in PRESETS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=f"default {full} ({quick} with --quick)")
    ap.add_argument("--concise-format", choices=("concise", "keyed"), default="concise",
                    help="the answer format of SA, DE and mixed SFT (keyed: concise values, every label kept as a key)")
    ap.add_argument("--datasets", nargs="+", default=["NER/CoNLL2003", "RE/CoNLL2004", "EE/PHEE"])
    ap.add_argument("--data", default=str(SHARED_DATA), help="real data root (IE INSTRUCTIONS layout)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42], help="training seeds (the data sample stays fixed)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--work-dir", default=None, help="default outputs/stage_ablation/<model>[-quick]")
    ap.add_argument("--out", default=None, help="default bench/results/stage_ablation_<model>.md (the work folder with --quick)")
    ap.add_argument("--fresh", action="store_true", help="clear the work folder first")
    ap.add_argument("--mixed-seconds", type=float, default=None,
                    help="mixed SFT's max_time instead of the chain's trained seconds (when the chain ran beside other "
                         "jobs: give the seconds it would have taken alone, and say how they were estimated)")
    ap.add_argument("--stop-after", choices=ARMS, default=ARMS[-1],
                    help="train and score the arms up to this one and stop (a later invocation with the same work folder "
                         "reuses them and goes on)")
    args = ap.parse_args(argv)
    for k, vals in PRESETS.items():
        if getattr(args, k) is None:
            setattr(args, k, vals[args.quick])
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    from prouie_pl.reader import load_records

    torch.set_num_threads(args.threads)
    t0, name = time.perf_counter(), f"stage_ablation_{Path(args.model).name}"
    work = Path(args.work_dir or REPO / "outputs" / "stage_ablation" / (args.model + "-quick" * args.quick)).resolve()
    out = Path(args.out) if args.out else (work if args.quick else RESULTS) / f"{name}.md"
    settings = {k: v for k, v in vars(args).items()
                if k not in ("seeds", "threads", "bootstrap", "work_dir", "out", "fresh", "mixed_seconds", "stop_after")}
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    stamp, args.data_dir, args.n_tasks = work / "settings.json", work / "data", len({d.split("/")[0] for d in args.datasets})
    if stamp.is_file() and json.loads(stamp.read_text()) != settings:
        raise SystemExit(f"{work} holds a run with other settings ({stamp}); pass --fresh or another --work-dir")
    if not stamp.is_file():
        write_subset(Path(args.data), args.data_dir, args.datasets, args.train, args.test, args.data_seed, args.dev)
        stamp.write_text(json.dumps(settings, indent=2) + "\n")
    test_records = load_records(args.data_dir, "test", datasets=args.datasets)
    seed = args.seeds[0]
    args.root = work / f"seed{seed}"
    stages, arms = {}, {}
    for s in STAGES:
        mixed = None
        if s.kind == "mixed":
            mixed = args.mixed_seconds or sum(trained_seconds(stages[x.name]) for x in STAGES[:3])
        stages[s.name] = train_stage(s, args, seed, mixed)
        folder = args.root / s.name
        arms[s.arm] = {"report": json.loads((folder / "report.json").read_text()), "shapes": answer_shapes(folder),
                       "counts": per_sentence_counts(*read_predictions(folder, test_records))}
        write_report(args, argv, out, stages, arms, gold_empty(test_records), time.perf_counter() - t0)
        if s.arm == args.stop_after:
            break
    print(f"[stage_ablation] results: {out} and {out.with_suffix('.json')}")
    return 0


def write_report(args, argv, out: Path, stages: dict, arms: dict, n_gold_empty: int, total_s: float) -> None:
    """The results file and its raw figures, for the arms finished so far."""
    diffs = {}
    for a, ref in COMPARISONS:
        if a in arms and ref in arms:
            diffs[(a, ref)] = paired_differences({ref: [arms[ref]["counts"]], a: [arms[a]["counts"]]}, ref, args.bootstrap)[a]
    curve = dev_curve(args.root / "cm")
    body = "\n\n".join([setup_text(args, argv, total_s), score_tables(args, arms, diffs, n_gold_empty), cost_tables(stages, curve, args.mixed_seconds)])
    write_result(out.name, f"Stage ablation ({args.model}, CPU)", body, str(out), keep_notes=True)
    raw = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "stages": stages, "cm_dev_curve": curve, "gold_empty_test_sentences": n_gold_empty,
           "arms": {a: {"report": v["report"], "answers": v["shapes"]} for a, v in arms.items()},
           "differences": {f"{a} - {ref}": {" ".join(filter(None, k)): v for k, v in d.items()} for (a, ref), d in diffs.items()}}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
