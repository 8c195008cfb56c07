"""Stage ablation at one wall-clock budget: mixed SFT, CM, CM+SA and CM+SA+DE on real data.

    python bench/stage_ablation.py --model gemma-3-270m    # bench/results/stage_ablation_gemma-3-270m.md (~70 min)
    python bench/stage_ablation.py --model tiny --quick    # smoke run, about a minute, results in the work folder

Every arm trains for B = ``--budget`` seconds in all, enforced by Lightning's ``trainer.max_time`` (model
loading and test decoding are not counted); with c = ``--cm-share`` x B and d = ``--de-share`` x B:

    mixed     SFT on every task shuffled together (``data.schedule: mixed``), concise format   B
    CM        CM curriculum NER -> NER+RE -> NER+RE+EE (cumulative), full format             B
    CM+SA     CM for c, then SA (stratified sample, concise) for B - c
    CM+SA+DE  the CM stage of CM+SA (the same run), then SA for B - c - d, then DE (GRPO) for d

DE takes its time out of SA, not out of CM, so CM+SA+DE can share CM+SA's CM stage and still train for B; CM+SA
against CM asks whether the last B - c seconds are better spent on SA than on more CM, CM+SA+DE against CM+SA
whether the last d are better spent on GRPO than on more SA.  (Reusing the CM arm's stage inside CM+SA would
hand CM+SA B + SA seconds.)  The run trains 4B - c seconds.

Step sizing: SFT stages decay their learning rate over a planned step count and the curriculum advances by
epoch, so steps are fixed up front from the run's own rate: a calibration trains a throwaway adapter for a few
steps in each target format (first step dropped) and measures seconds per training token; a stage plans
``share / (s per token x batch x mean tokens per example of its mix)`` steps, and ``max_time`` stays the hard
cap.  CM runs in units of k = steps // 6 batches (``trainer.limit_train_batches: k``, ``data.epochs_per_phase:
[1, 2, 3]``): NER for k steps, NER+RE for 2k, NER+RE+EE for the rest, the shares one epoch per phase gives data
sets of equal size; EE starts near half the planned steps, so a rate that is off by up to 2x still reaches it
(Lightning does not stop before the curriculum's last phase has begun).  GRPO's learning rate is constant after
warm-up, so DE simply runs until its ``max_time``.

Data: a seeded sample of ``--train`` training sentences per data set (one pool for every arm), the first
``--test`` test sentences (as ``real_model_learning.py``), a 16-sentence dev sample that nothing here uses (no
tuning, no validation: every stage hands on its last adapter).  Each stage runs through
``prouie_pl.pipeline.run_stage``: the frozen base trains in the dtype its config names (SFT: ``auto``, bf16 on a
CPU with AVX512-BF16; DE, nearly all sampling: float32, which samples faster there) and is cast to
float32 for greedy test decoding (``test_dtype: float32``); ``run_stage`` always decodes, so stages that end no
arm decode one test sentence per data set.  Intervals come from a paired bootstrap: test sentences resampled
within each data set, the same draws for every arm.  Finished stages in ``--work-dir`` are reused on a rerun.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402

from _bootstrap import per_sentence_counts, percentile_interval, read_predictions, resampled_f1  # noqa: E402
from _common import REPO, RESULTS, SHARED_DATA, markdown_table, write_result  # noqa: E402

ARMS = ("mixed", "CM", "CM+SA", "CM+SA+DE")
HEADLINE = ("NER", "RE_strict", "EE_trigger", "EE_argument")
CONFIG_OF = {"mixed": "cm", "cm": "cm", "sa": "sa", "de": "de"}
PRESETS = {  # full run / --quick
    "budget": (600, 10), "train": (300, 32), "test": (100, 6), "sa_per_dataset": (64, 8), "calibration_steps": (8, 3),
    "max_new_tokens_full": (192, 48), "max_new_tokens_concise": (128, 32), "threads": (2, 1)}
CALLBACKS = [{"class_path": "prouie_pl.callbacks.AdapterExport", "init_args": {"monitor": None}},
             {"class_path": "prouie_pl.callbacks.GenerationEvaluator", "init_args": {"sample_rows": 0}},
             {"class_path": "prouie_pl.callbacks.CurriculumCallback"}]


@dataclass(frozen=True)
class Stage:
    name: str                    # folder under the seed's folder
    kind: str                    # mixed | cm | sa | de
    seconds: int                 # its share of the arm's budget
    after: Optional[str] = None  # the stage whose adapter it starts from


def arm_stages(budget: int, cm_share: float, de_share: float) -> dict[str, list[Stage]]:
    c, d = round(cm_share * budget), round(de_share * budget)
    if not (c >= 1 and d >= 1 and budget - c - d >= 1):
        raise SystemExit(f"--cm-share {cm_share} / --de-share {de_share} of --budget {budget} s leave a stage without time")
    cm, sa_short = Stage("CM_SA/cm", "cm", c), Stage("CM_SA_DE/sa", "sa", budget - c - d, "CM_SA/cm")
    return {"mixed": [Stage("mixed/sft", "mixed", budget)], "CM": [Stage("CM/cm", "cm", budget)],
            "CM+SA": [cm, Stage("CM_SA/sa", "sa", budget - c, cm.name)],
            "CM+SA+DE": [cm, sa_short, Stage("CM_SA_DE/de", "de", d, sa_short.name)]}


def stage_tokens(kind: str, tokens: dict) -> float:
    """Mean tokens per training example over a stage; CM weighs its phase i (the first i tasks) by i."""
    def mix(tasks, fmt):
        return sum(tokens[t]["n"] * tokens[t][fmt] for t in tasks) / sum(tokens[t]["n"] for t in tasks)
    tasks = list(tokens)
    if kind != "cm":
        return mix(tasks, "concise")
    return sum(i * mix(tasks[:i], "full") for i in range(1, len(tasks) + 1)) / (len(tasks) * (len(tasks) + 1) / 2)


def plan_steps(stage: Stage, cal: dict, batch: int) -> tuple[Optional[int], Optional[int]]:
    """(max_steps, curriculum unit in batches) of a stage; (None, None) for DE, which runs until max_time."""
    if stage.kind == "de":
        return None, None
    per_token = cal["full" if stage.kind == "cm" else "concise"]["s_per_token"]
    steps = max(1, int(stage.seconds / (per_token * batch * stage_tokens(stage.kind, cal["tokens"]))))
    if stage.kind != "cm":
        return steps, None
    unit = max(1, steps // (len(cal["tokens"]) * (len(cal["tokens"]) + 1) // 2))
    return max(steps, last_phase_start(unit, len(cal["tokens"])) - 1 + unit), unit  # at least one unit of EE


def last_phase_start(unit: int, n_tasks: int) -> int:
    """The first step of the cumulative curriculum's last phase with ``epochs_per_phase: [1, .., n]``."""
    return (n_tasks * (n_tasks + 1) // 2 - n_tasks) * unit + 1


class StepClock(L.Callback):
    """Seconds and non-padding tokens of every training step (the time between consecutive step ends)."""

    def __init__(self):
        self.steps: list[tuple[float, int]] = []

    def on_train_start(self, trainer, pl_module):
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        self.steps.append((now - self._last, int(batch["attention_mask"].sum())))
        self._last = now


def config_path(model: str, kind: str) -> Path:
    folder, name = REPO / "configs" / model, CONFIG_OF[kind]
    path = next((p for p in (folder / f"{name}_cpu.yaml", folder / f"{name}.yaml") if p.is_file()), None)
    if path is None:
        raise SystemExit(f"--model {model}: no {name}_cpu.yaml or {name}.yaml under {folder}")
    return path


def config_data(model: str, kind: str) -> dict:
    import yaml

    return yaml.safe_load(config_path(model, kind).read_text())["data"]


def data_options(kind: str, args, data_dir: Path, seed: int, n_tasks: int) -> dict:
    o = {"seed_everything": seed, "data.seed": seed, "data.data_dir": str(data_dir), "data.datasets": args.datasets,
         "data.max_train_records": args.train, "data.max_val_records": 0,
         "trainer.enable_progress_bar": False, "trainer.enable_checkpointing": False}
    if kind == "mixed":
        o.update({"data.schedule": "mixed", "data.epochs_per_phase": 1, "data.target_format": "concise"})
    elif kind == "cm":
        o.update({"data.schedule": "cumulative", "data.epochs_per_phase": list(range(1, n_tasks + 1))})
    elif kind == "sa":
        o["data.sample_per_dataset"] = args.sa_per_dataset
    elif kind == "de":  # the config's prompt sample, within the pool
        o["data.sample_per_dataset"] = min(args.train, int(config_data(args.model, "de").get("sample_per_dataset") or args.train))
    return o


def fit_options(folder: Path, seconds: int, steps: Optional[int], unit: Optional[int]) -> dict:
    o = {"trainer.max_time": f"00:00:{seconds // 60:02d}:{seconds % 60:02d}", "trainer.max_epochs": -1,
         "trainer.max_steps": steps or 100_000, "trainer.limit_val_batches": 0, "trainer.callbacks": CALLBACKS,
         "trainer.logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(folder)}},
         "model.init_args.lora.init_adapter": "null"}  # run_stage sets the previous stage's adapter after this
    return {**o, "trainer.limit_train_batches": unit} if unit else o


def train_stage(s: Stage, args, root: Path, seed: int, steps: Optional[int], unit: Optional[int], test: int) -> dict:
    """One stage through ``run_stage`` (fit, then greedy decoding of ``test`` test sentences per data set with the
    base in float32); its ``stage.json`` is reused on a rerun."""
    from prouie_pl.pipeline import DONE, run_stage

    folder = root / s.name
    if not (folder / DONE).is_file():
        planned = f"{steps} steps planned" if steps else "until max_time"
        print(f"[stage_ablation] seed {seed}: {s.name} for {s.seconds} s ({planned})", flush=True)
        full = s.kind == "cm"
        opts = {**data_options(s.kind, args, args.data_dir, seed, args.n_tasks), **fit_options(folder, s.seconds, steps, unit),
                "data.max_test_records": test,
                "model.init_args.generation.max_new_tokens": args.max_new_tokens_full if full else args.max_new_tokens_concise}
        run_stage(s.kind, str(config_path(args.model, s.kind)), folder, str(root / s.after / "adapter") if s.after else None,
                  opts, "last", test_dtype="float32")
        gc.collect()  # frees the model before the next stage loads its own
    return json.loads((folder / DONE).read_text())


def calibrate(args, data_dir: Path, work: Path) -> dict:
    """Seconds per training token in each target format (every task mixed), and the pool's tokens per example."""
    from prouie_pl.datamodules.batching import encode_sft
    from prouie_pl.formats import example
    from prouie_pl.lightning_cli import build_cli
    from prouie_pl.reader import load_records
    from prouie_pl.wiring import connect

    t0, cal, module = time.perf_counter(), {}, None
    for fmt in ("full", "concise"):
        opts = {**data_options("mixed", args, data_dir, args.seeds[0], args.n_tasks), "data.target_format": fmt,
                **fit_options(work / "calibration" / fmt, 3600, args.calibration_steps, None),
                "trainer.default_root_dir": str(work / "calibration" / fmt)}
        argv = [x for k, v in opts.items() for x in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]
        cli = build_cli(["--config", str(config_path(args.model, "cm"))] + argv, run=False)
        clock = StepClock()
        cli.trainer.callbacks.append(clock)
        if module is not None:  # the second format reuses the loaded model
            connect(module, cli.datamodule, cli.trainer)
        cli.trainer.fit(module or cli.model, datamodule=cli.datamodule)
        module, max_len, steps = module or cli.model, cli.datamodule.max_seq_length, clock.steps[1:]  # step 1 warms up
        cal[fmt] = {"s_per_token": sum(s for s, _ in steps) / sum(t for _, t in steps),
                    "s_per_step": statistics.mean(s for s, _ in steps), "tokens_per_step": statistics.mean(t for _, t in steps)}
    tokens: dict = {}
    for rec in load_records(data_dir, "train", datasets=args.datasets):
        for fmt in ("full", "concise"):
            enc = encode_sft(module.tokenizer, *example(rec, fmt), max_len)
            if enc is not None:
                tokens.setdefault(rec.task, {}).setdefault(fmt, []).append(len(enc.input_ids))
    cal["tokens"] = {t: {"n": len(v["full"]), **{f: statistics.mean(x) for f, x in v.items()}} for t, v in tokens.items()}
    cal["seconds"] = time.perf_counter() - t0
    del module, cli
    gc.collect()
    return cal


def write_subset(src: Path, dst: Path, datasets: list[str], n_train: int, n_test: int, seed: int) -> None:
    """Seeded train and dev samples and the first ``n_test`` test sentences per data set, same layout."""
    from prouie_pl.reader import discover, write_dataset

    for info in discover(src, datasets=datasets):
        splits = {}
        for split, n in (("train", n_train), ("dev", 16), ("test", n_test)):
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

    rng = np.random.default_rng(seed)
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


def score_tables(args, runs: dict, diffs: dict) -> str:
    from prouie_pl.scoring import parse_failures

    reports = {a: [r["arms"][a]["report"] for r in runs.values()] for a in ARMS}
    mean = {a: {k: statistics.mean(headline(r)[k] for r in reports[a]) for k in headline(reports[a][0])} for a in ARMS}
    keys = list(mean["mixed"])
    names = [f"{m} {ds}" if m else ds for ds, m in keys]
    fails = {a: statistics.mean(parse_failures(r) for r in reports[a]) for a in ARMS}
    f1_rows = [[a] + [f"{mean[a][k]:.1f}" for k in keys] + [f"{fails[a]:g}"] for a in ARMS]
    diff_rows = [[a] + [f"{mean[a][k] - mean['mixed'][k]:+.1f} [{diffs[a][k][0]:+.1f}, {diffs[a][k][1]:+.1f}]" for k in keys]
                 for a in ARMS[1:]]
    return "\n".join([
        "## Test F1 (strict, %)", "", markdown_table(["arm"] + names + ["parse failures"], f1_rows), "",
        f"## Difference from mixed SFT (F1 points, 95% paired bootstrap interval, {args.bootstrap} resamples)", "",
        markdown_table(["arm"] + names, diff_rows)])


def cost_tables(args, plan: dict, cal: dict, runs: dict) -> str:
    stage_rows, arm_rows = [], []
    for seed, run in runs.items():
        for arm in ARMS:
            infos = [run["stages"][s.name] for s in plan[arm]]
            for s, i in zip(plan[arm], infos):
                c = i["cost"]
                planned, unit = plan_steps(s, cal, int(config_data(args.model, s.kind)["batch_size"]))
                ee = last_phase_start(unit, args.n_tasks) if unit else None
                note = "; ".join(filter(None, ["shared with CM+SA" if arm == "CM+SA+DE" and s.kind == "cm" else "",
                                               f"EE phase from step {ee}{'' if c['steps'] >= ee else ' (not reached)'}, "
                                               f"phase unit {unit} step{'s' * (unit > 1)}" if ee else ""]))
                stage_rows.append([seed, arm, "SFT" if s.kind == "mixed" else s.kind.upper(), s.seconds, f"{c['seconds']:.0f}",
                                   planned or "-", c["steps"], f"{c['seconds'] / max(c['steps'], 1):.2f}", note or "-"])
            arm_rows.append([seed, arm, f"{sum(i['cost']['seconds'] for i in infos):.0f}",
                             f"{sum(i['seconds'] - i['test_seconds'] for i in infos):.0f}",
                             " + ".join(str(i["cost"]["steps"]) for i in infos), f"{sum(i['cost']['tokens'] for i in infos):,}",
                             sum(i["cost"]["completions"] for i in infos) or "-", f"{infos[-1]['test_seconds']:.0f}"])
    return "\n".join([
        "## Cost", "", markdown_table(["seed", "arm", "stage", "budget s", "trained s", "planned steps", "steps", "s a step",
                                       "note"], stage_rows), "",
        "Per arm (`wall s` adds model loading to training; `test s` is greedy decoding of the test sentences):", "",
        markdown_table(["seed", "arm", "trained s", "wall s", "steps", "SFT tokens", "GRPO completions", "test s"], arm_rows)])


def setup_text(args, argv, plan, cal, total_s) -> str:
    seeds = ", ".join(map(str, args.seeds))
    cal_text = "; ".join(f"{f} format {cal[f]['s_per_step']:.2f} s a step of {cal[f]['tokens_per_step']:.0f} tokens "
                         f"({1000 * cal[f]['s_per_token']:.2f} ms a token)" for f in ("full", "concise"))
    return (
        f"`python bench/stage_ablation.py {' '.join(argv)}` on {time.strftime('%Y-%m-%d')}, torch threads {args.threads}, "
        + (f"one training seed ({seeds}): the intervals show test-sentence noise only, not the spread between training runs."
           if len(args.seeds) == 1 else f"training seeds {seeds}: F1 cells are means over seeds.")
        + f"\n\nBudget B = {args.budget} s of training per arm (`max_time`; loading and test decoding not counted): CM+SA = "
        f"CM {plan['CM+SA'][0].seconds} s + SA {plan['CM+SA'][1].seconds} s; CM+SA+DE = the same CM run + SA "
        f"{plan['CM+SA+DE'][1].seconds} s + DE {plan['CM+SA+DE'][2].seconds} s.  Data: {', '.join(args.datasets)} from "
        f"`{args.data}`: {args.train} training sentences per data set (seed {args.data_seed}), SA sample "
        f"{args.sa_per_dataset} per data set, the first {args.test} test sentences.  Greedy test decoding with the base in "
        f"float32, at most {args.max_new_tokens_full} (full) / {args.max_new_tokens_concise} (concise) new tokens.  "
        f"Calibration ({args.calibration_steps} steps per format, the first dropped; {cal['seconds']:.0f} s with loading): "
        f"{cal_text}.  This invocation took {total_s / 60:.1f} min.")


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma-3-270m", help="a folder of configs/ (its cm, sa and de configs are used)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny budget and data")
    for k, (full, quick) in PRESETS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=f"default {full} ({quick} with --quick)")
    ap.add_argument("--cm-share", type=float, default=0.6)
    ap.add_argument("--de-share", type=float, default=0.2)
    ap.add_argument("--datasets", nargs="+", default=["NER/CoNLL2003", "RE/CoNLL2004", "EE/PHEE"])
    ap.add_argument("--data", default=str(SHARED_DATA), help="real data root (IE INSTRUCTIONS layout)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42], help="training seeds (the data sample stays fixed)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--work-dir", default=None, help="default outputs/stage_ablation/<model>[-quick]")
    ap.add_argument("--out", default=None, help="default bench/results/stage_ablation_<model>.md (the work folder with --quick)")
    ap.add_argument("--fresh", action="store_true", help="clear the work folder first")
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
    settings = {k: v for k, v in vars(args).items() if k not in ("seeds", "threads", "bootstrap", "work_dir", "out", "fresh")}
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    stamp, args.data_dir, args.n_tasks = work / "settings.json", work / "data", len({d.split("/")[0] for d in args.datasets})
    if stamp.is_file() and json.loads(stamp.read_text()) != settings:
        raise SystemExit(f"{work} holds a run with other settings ({stamp}); pass --fresh or another --work-dir")
    if not stamp.is_file():
        write_subset(Path(args.data), args.data_dir, args.datasets, args.train, args.test, args.data_seed)
        stamp.write_text(json.dumps(settings, indent=2) + "\n")
    plan = arm_stages(args.budget, args.cm_share, args.de_share)
    if not (work / "calibration.json").is_file():
        (work / "calibration.json").write_text(json.dumps(calibrate(args, args.data_dir, work), indent=2) + "\n")
    cal = json.loads((work / "calibration.json").read_text())
    print(f"[stage_ablation] calibration {json.dumps({f: cal[f] for f in ('full', 'concise')})}; "
          f"{4 * args.budget - plan['CM+SA'][0].seconds} s of training per seed", flush=True)
    test_records, ends = load_records(args.data_dir, "test", datasets=args.datasets), {ss[-1] for ss in plan.values()}
    runs = {}
    for seed in args.seeds:
        root, stages, arms = work / f"seed{seed}", {}, {}
        for s in dict.fromkeys(s for a in ARMS for s in plan[a]):
            steps, unit = plan_steps(s, cal, int(config_data(args.model, s.kind)["batch_size"]))
            stages[s.name] = train_stage(s, args, root, seed, steps, unit, args.test if s in ends else 1)
        for a in ARMS:
            folder = root / plan[a][-1].name
            arms[a] = {"report": json.loads((folder / "report.json").read_text()),
                       "counts": per_sentence_counts(*read_predictions(folder, test_records))}
        runs[seed] = {"stages": stages, "arms": arms}
    diffs = paired_differences({a: [r["arms"][a]["counts"] for r in runs.values()] for a in ARMS}, "mixed", args.bootstrap)
    body = "\n\n".join([setup_text(args, argv, plan, cal, time.perf_counter() - t0), score_tables(args, runs, diffs),
                        cost_tables(args, plan, cal, runs)])
    write_result(out.name, f"Stage ablation at one wall-clock budget ({args.model}, CPU)", body, str(out), keep_notes=True)
    raw = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "calibration": cal,
           "plan": {a: [vars(s) for s in ss] for a, ss in plan.items()},
           "runs": {seed: {"stages": r["stages"], "reports": {a: v["report"] for a, v in r["arms"].items()}} for seed, r in runs.items()},
           "differences_vs_mixed": {a: {" ".join(filter(None, k)): v for k, v in d.items()} for a, d in diffs.items()}}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    print(f"[stage_ablation] raw figures: {out.with_suffix('.json')}")
    print(f"[stage_ablation] CM+SA adapter: {work / f'seed{args.seeds[0]}' / 'CM_SA' / 'sa' / 'adapter'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
