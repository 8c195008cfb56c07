"""Stage ablation at one optimizer-step budget: CM, CM+SA, CM+SA+DE and mixed multitask SFT.

Data: a small, seeded random subset of real data sets from ../shared/data/uie (default NER/CoNLL2003,
RE/CoNLL2004, EE/GENIA2011), sentences of at most ``--max-words`` words, ``--train`` / ``--dev`` / ``--test``
records per data set, written in the IE INSTRUCTIONS layout under the work folder.  A tiny Llama and its
byte-level BPE tokenizer are built from scratch on that subset's training split
(``prouie_pl.tiny_model.build_tiny_model``, ``--pretrain-steps`` steps of plain LM pre-training), then four
arms train LoRA adapters on it through ``prouie_pl.pipeline.run_pipeline``:

* ``CM``: the cm stage alone (cumulative curriculum NER; NER+RE; NER+RE+EE, full format) for B steps;
* ``CM+SA``: cm for ``round(cm_share * B)`` steps, then sa (stratified sample, concise format) for the rest;
* ``CM+SA+DE``: the same cm stage (reused from the CM+SA arm: same config, same seed), sa for the rest minus
  D steps, then D GRPO steps of de; one GRPO optimizer step counts as one step of B (its compute is much
  larger: each step samples G completions for each of its prompts);
* ``mixed``: the cm stage with ``data.schedule: mixed`` (every task shuffled together from the first step), in
  the full format (``--mixed-format concise`` for the concise one), for B steps.

Every stage runs a fixed number of optimizer steps (``trainer.max_steps``; no early stopping, no validation
passes) and hands on its last adapter (``adapter: last``).  The curriculum advances by epoch, one epoch each
for the NER and NER+RE phases (``data.epochs_per_phase: [1, 1, 1]``); the last phase is open-ended and runs
until the step budget ends, and the script checks that the last phase starts within the budget of every arm.
Each arm is scored on the same test subset (greedy decoding, the project's strict scorer); the table lists the
test F1 of each metric and data set, the per-task averages and the overall score
(``prouie_pl.scoring.overall_f1``: mean of NER, RE and the mean of EE trigger and argument F1).

    python bench/stage_ablation.py --quick          # smoke run (about 10 min on 2 shared CPU cores; all scores 0)
    python bench/stage_ablation.py                  # the fuller run (prints its estimated wall time first)
    python bench/stage_ablation.py --budget 400 --train 240 --test 60 --pretrain-steps 600 --seeds 42 43

Finished stages are kept in the work folder and skipped on a rerun with the same settings.  The stages take their
LoRA and learning-rate settings from the shipped ``configs/tiny/{cm,sa,de}.yaml`` (the results file lists the values
used); after changing those files, rerun with ``--fresh``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

from _common import REPO, SHARED_DATA, markdown_table, write_result

DEFAULT_DATASETS = ["NER/CoNLL2003", "RE/CoNLL2004", "EE/GENIA2011"]
ARMS = ("CM", "CM+SA", "CM+SA+DE", "mixed")

PRESETS = {
    "quick": dict(train=48, dev=4, test=16, max_words=30, pretrain_steps=150, budget=48, cm_share=0.6, de_steps=4,
                  sa_per_dataset=24, de_per_dataset=24, batch_size=8),
    "default": dict(train=320, dev=16, test=80, max_words=30, pretrain_steps=1500, budget=640, cm_share=0.65, de_steps=16,
                    sa_per_dataset=96, de_per_dataset=64, batch_size=8),
}

# seconds per unit with one torch thread on a shared 2-core CPU (measured in a run with --budget 400 --train 240):
# pre-training step (batch 16), SFT step (batch 8), GRPO step (4 prompts x 4 completions), decoded test record
COST = {"pretrain": 0.85, "sft": 0.6, "grpo": 3.0, "decode": 0.35}


# ------------------------------------------------------------------------------------------ data subset


def raw_record(rec) -> dict:
    """A parsed Record back in the layout's JSON form."""

    def span(x):
        return {"pos": list(x.pos)} if x.pos else {}

    if rec.task == "NER":
        return {"sentence": rec.sentence, "entities": [{"name": e.name, "type": e.type, **span(e)} for e in rec.entities]}
    if rec.task == "RE":
        ent = lambda e: {"name": e.name, "type": e.type, **span(e)}  # noqa: E731
        return {"sentence": rec.sentence, "relations": [{"head": ent(r.head), "type": r.type, "tail": ent(r.tail)} for r in rec.relations]}
    return {"sentence": rec.sentence,
            "events": [{"trigger": e.trigger, "type": e.type, **span(e),
                        "arguments": [{"name": a.name, "role": a.role, **span(a)} for a in e.arguments]} for e in rec.events]}


def write_subset(src: Path, dst: Path, datasets: list[str], sizes: dict, max_words: int, seed: int) -> dict:
    """Seeded random sample of short sentences per data set and split, written in the IE INSTRUCTIONS layout."""
    from prouie_pl.reader import discover, load_records

    counts = {}
    for info in discover(src, datasets=datasets):
        folder = dst / info.task / info.name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(info.path / "labels.json", folder / "labels.json")
        for split, n in sizes.items():
            recs = load_records(src, split, datasets=[info.id], on_error="skip")
            pool = [r for r in recs if len(r.sentence.split()) <= max_words]
            random.Random(f"{seed}/{info.id}/{split}").shuffle(pool)
            chosen = sorted(pool[:n], key=lambda r: r.index)
            (folder / f"{split}.json").write_text(json.dumps([raw_record(r) for r in chosen], ensure_ascii=False), encoding="utf-8")
            back = load_records(dst, split, datasets=[info.id])
            assert [(r.sentence, r.entities, r.relations, r.events) for r in back] == \
                   [(r.sentence, r.entities, r.relations, r.events) for r in chosen], f"{info.id}/{split}: subset does not read back unchanged"
            counts[f"{info.id}/{split}"] = {"written": len(chosen), "eligible": len(pool), "all": len(recs)}
    return counts


# ------------------------------------------------------------------------------------------ configs


def stage_configs(cfg_dir: Path, model_dir: Path, data_dir: Path, args) -> dict[str, Path]:
    """The shipped tiny stage configs with this benchmark's model, data and fixed-step settings."""
    import yaml

    keep = {"StageCheckpoint", "AdapterExport", "GenerationEvaluator", "CurriculumCallback"}
    out = {}
    for stage in ("cm", "sa", "de"):
        cfg = yaml.safe_load((REPO / "configs" / "tiny" / f"{stage}.yaml").read_text())
        tr = cfg["trainer"]
        tr["callbacks"] = [c for c in tr["callbacks"] if c["class_path"].rsplit(".", 1)[-1] in keep]
        for k in ("val_check_interval", "check_val_every_n_epoch"):
            tr.pop(k, None)
        tr.update(max_epochs=-1, max_steps=1, limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                  log_every_n_steps=5, default_root_dir=str(cfg_dir / "unused"))
        m = cfg["model"]["init_args"]
        m["base"] = {"name_or_path": str(model_dir)}
        m.setdefault("lora", {}).pop("init_adapter", None)
        m["generation"] = {"max_new_tokens": args.max_new_tokens_full if stage == "cm" else args.max_new_tokens_concise}
        if stage == "de":
            m["rollout"]["max_new_tokens"] = args.max_new_tokens_concise
        d = cfg["data"]
        d.update(data_dir=str(data_dir), batch_size=4 if stage == "de" else args.batch_size, eval_batch_size=args.eval_batch_size,
                 max_val_records=None, max_test_records=None)
        if stage == "cm":
            d.update(schedule="cumulative", epochs_per_phase=[1, 1, 1])
        elif stage == "sa":
            d["sample_per_dataset"] = args.sa_per_dataset
        else:
            d["sample_per_dataset"] = args.de_per_dataset
        path = cfg_dir / f"{stage}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out[stage] = path
    return out


def stage_hyperparameters(cfgs: dict[str, Path]) -> dict:
    """LoRA rank and each stage's learning rate, as written into the stage configs (for the results file)."""
    import yaml

    init = {s: yaml.safe_load(p.read_text())["model"]["init_args"] for s, p in cfgs.items()}
    return {"r": init["cm"].get("lora", {}).get("r", 16), **{s: float(a["learning_rate"]) for s, a in init.items()}}


def arm_plan(args) -> dict[str, dict]:
    """Steps per stage of each arm (every arm sums to the budget)."""
    B = args.budget
    cm = round(args.cm_share * B)
    sa = B - cm
    if sa - args.de_steps < 1:
        sys.exit(f"--de-steps {args.de_steps} leaves no SA steps (budget {B}, CM share {args.cm_share}: {sa} steps after CM)")
    return {
        "CM": {"cm": B},
        "CM+SA": {"cm": cm, "sa": sa},
        "CM+SA+DE": {"cm": cm, "sa": sa - args.de_steps, "de": args.de_steps},
        "mixed": {"cm": B},
    }


def pipeline_yaml(path: Path, stage_cfgs: dict, steps: dict, seed: int, mixed_format: str | None) -> Path:
    import yaml

    so = {}
    for s, n in steps.items():
        so[s] = {"trainer.max_steps": n}
    if mixed_format:
        so["cm"].update({"data.schedule": "mixed", "data.epochs_per_phase": 1, "data.target_format": mixed_format})
    cfg = {"stages": {s: str(stage_cfgs[s]) for s in steps}, "overrides": {"seed_everything": seed, "data.seed": seed},
           "stage_overrides": so, "adapter": "last"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def curriculum_check(data_dir: Path, batch_size: int, plan: dict) -> dict:
    """Steps per epoch of each cumulative phase; exits when a CM budget ends before the last phase starts."""
    from prouie_pl.reader import load_records

    recs = load_records(data_dir, "train")
    by_task = {t: sum(1 for r in recs if r.task == t) for t in ("NER", "RE", "EE")}
    tasks = [t for t in ("NER", "RE", "EE") if by_task[t]]
    per_phase = [-(-sum(by_task[t] for t in tasks[: i + 1]) // batch_size) for i in range(len(tasks))]
    last_start = sum(per_phase[:-1])
    for arm, steps in plan.items():
        if arm != "mixed" and steps["cm"] <= last_start:
            sys.exit(f"arm {arm}: {steps['cm']} CM steps end before the curriculum's last phase starts (step {last_start}); "
                     "raise --budget or --cm-share, or lower --train")
    return {"steps_per_epoch": dict(zip(["+".join(tasks[: i + 1]) for i in range(len(tasks))], per_phase)), "last_phase_start": last_start}


# ------------------------------------------------------------------------------------------ running


def run_arm(arm: str, arm_dir: Path, pipe: Path, reuse_cm_from: Path | None) -> float:
    from prouie_pl.pipeline import run_pipeline

    if reuse_cm_from is not None and not (arm_dir / "cm" / "stage.json").is_file():
        src = reuse_cm_from / "cm"
        shutil.copytree(src, arm_dir / "cm", dirs_exist_ok=True)
        info = json.loads((arm_dir / "cm" / "stage.json").read_text())
        info["adapter"] = str(arm_dir / "cm" / Path(info["adapter"]).name)
        info["reused_from"] = str(src)
        (arm_dir / "cm" / "stage.json").write_text(json.dumps(info, indent=2) + "\n")
    t0 = time.perf_counter()
    print(f"\n[stage_ablation] === arm {arm} -> {arm_dir}", flush=True)
    run_pipeline(str(pipe), str(arm_dir))
    return time.perf_counter() - t0


def read_report(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "report.json").read_text())


def columns(report: dict) -> list[tuple[str, str]]:
    return [(m, ds) for m, entry in report["tasks"].items() for ds in entry["datasets"]]


def row_scores(report: dict, cols: list[tuple[str, str]]) -> dict:
    from prouie_pl.scoring import overall_f1, task_scores

    t = report["tasks"]
    out = {f"{m} {ds}": t[m]["datasets"][ds]["f1"] if m in t and ds in t[m]["datasets"] else float("nan") for m, ds in cols}
    out.update({f"task {k}": v for k, v in task_scores(report).items()})
    out["overall"] = overall_f1(report)
    ds_seen = {}
    for m, entry in t.items():
        for ds, d in entry["datasets"].items():
            ds_seen[ds] = d["parse_failures"]
    out["parse failures"] = sum(ds_seen.values())
    out["truncated"] = report.get("truncated_outputs", 0)
    return out


def fmt_mean(vals: list[float], digits: int = 1) -> str:
    vals = [v for v in vals if v == v]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


# ------------------------------------------------------------------------------------------ sentence bootstrap


def record_counts(data_dir: Path, stage_dir: Path) -> dict:
    """Per test sentence: (tp, fp, fn) per metric, by data set, in a fixed record order."""
    from prouie_pl.reader import load_records
    from prouie_pl.scoring import Scorer

    recs = {(r.task, r.dataset, r.index): r for r in load_records(data_dir, "test")}
    outs = {}
    for line in (stage_dir / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        outs[(row["task"], row["dataset"], row["index"])] = row["output"]
    per_ds: dict = {}
    for key in sorted(recs):  # every test record is scored; one without a prediction counts as empty
        sc = Scorer("strict")
        sc.add(recs[key], outs.get(key))
        per_ds.setdefault(key[1], []).append({m: (c[key[1]].tp, c[key[1]].fp, c[key[1]].fn) for m, c in sc.counts.items()})
    return per_ds


def overall_from_counts(tot: dict) -> dict:
    """Per-task and overall F1 from summed counts ``{(metric, ds): [tp, fp, fn]}`` (as prouie_pl.scoring does)."""

    def f1(tp, fp, fn):
        return 200.0 * tp / (2 * tp + fp + fn) if tp else 0.0

    by_metric: dict = {}
    for (m, ds), (tp, fp, fn) in tot.items():
        by_metric.setdefault(m, []).append(f1(tp, fp, fn))
    avg = {m: sum(v) / len(v) for m, v in by_metric.items()}
    tasks = {}
    if "NER" in avg:
        tasks["NER"] = avg["NER"]
    if "RE_strict" in avg:
        tasks["RE"] = avg["RE_strict"]
    ee = [avg[m] for m in ("EE_trigger", "EE_argument") if m in avg]
    if ee:
        tasks["EE"] = sum(ee) / len(ee)
    tasks["overall"] = sum(tasks.values()) / len(tasks) if tasks else 0.0
    return tasks


def bootstrap(counts: dict[str, list[dict]], n_boot: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap over test sentences (resampled within each data set, the same draw for every arm).

    ``counts``: arm -> list over training seeds of :func:`record_counts` results.  Returns per arm the 95%
    interval of its overall score (mean over seeds) and of its difference to the CM arm.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    arms = list(counts)
    datasets = list(counts[arms[0]][0])
    metrics = {ds: sorted({m for rec in counts[arms[0]][0][ds] for m in rec}) for ds in datasets}
    arr = {}  # (arm, seed_i, ds) -> array [records, metrics, 3]
    for a in arms:
        for i, per_ds in enumerate(counts[a]):
            for ds in datasets:
                arr[(a, i, ds)] = np.array([[rec.get(m, (0, 0, 0)) for m in metrics[ds]] for rec in per_ds[ds]], dtype=float)
    draws = {a: [] for a in arms}
    for _ in range(n_boot):
        idx = {ds: rng.integers(0, len(counts[arms[0]][0][ds]), len(counts[arms[0]][0][ds])) for ds in datasets}
        for a in arms:
            vals = []
            for i in range(len(counts[a])):
                tot = {}
                for ds in datasets:
                    s = arr[(a, i, ds)][idx[ds]].sum(axis=0)
                    for j, m in enumerate(metrics[ds]):
                        tot[(m, ds)] = s[j]
                vals.append(overall_from_counts(tot)["overall"])
            draws[a].append(sum(vals) / len(vals))
    out = {}
    ref = np.array(draws["CM"])
    for a in arms:
        d = np.array(draws[a])
        diff = d - ref
        out[a] = {"ci": (float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))),
                  "diff_ci": (float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))),
                  "p_better": float((diff > 0).mean()), "p_tie": float((diff == 0).mean())}
    return out


# ------------------------------------------------------------------------------------------ main


def estimate_seconds(args, plan: dict, n_datasets: int) -> float:
    sft = plan["CM"]["cm"] + plan["CM+SA"]["cm"] + plan["CM+SA"]["sa"] + plan["CM+SA+DE"]["sa"] + plan["mixed"]["cm"]
    decodes = 6 * args.test * n_datasets  # CM, CM+SA (after cm and sa), CM+SA+DE (after sa and de), mixed
    per_seed = sft * COST["sft"] + args.de_steps * COST["grpo"] + decodes * COST["decode"]
    return args.pretrain_steps * COST["pretrain"] + len(args.seeds) * per_seed + 60


METRIC_NAMES = {"NER": "NER", "RE_strict": "RE strict", "RE_boundary": "RE boundary", "EE_trigger": "EE trigger", "EE_argument": "EE argument"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny budget and data (smoke run)")
    ap.add_argument("--data", default=str(SHARED_DATA), help="real data root (IE INSTRUCTIONS layout)")
    ap.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS)
    ap.add_argument("--work-dir", default=None, help="default: outputs/stage_ablation/<quick|default>")
    ap.add_argument("--out", default=None, help="results file (default bench/results/stage_ablation.md)")
    for k, v in PRESETS["default"].items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=None, help=f"default {v} (quick {PRESETS['quick'][k]})")
    ap.add_argument("--mixed-format", choices=("full", "concise"), default="full")
    ap.add_argument("--max-new-tokens-full", type=int, default=160)
    ap.add_argument("--max-new-tokens-concise", type=int, default=96)
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42], help="training seeds (subset and base model stay fixed)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the subset and of the base model")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared small machine a second thread mostly waits)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the test sentences")
    ap.add_argument("--fresh", action="store_true", help="delete the work folder first")
    args = ap.parse_args(argv)
    preset = "quick" if args.quick else "default"
    for k, v in PRESETS[preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    src = Path(args.data)
    if not all((src / t).is_dir() for t in ("NER", "RE", "EE")):
        sys.exit(f"stage_ablation needs the real data at {src} (ROOT/{{NER,RE,EE}}/<Dataset>/; set PROUIE_SHARED_DATA or --data); not found")

    plan = arm_plan(args)
    est = estimate_seconds(args, plan, len(args.datasets))
    print(f"[stage_ablation] {preset} setting, budget {args.budget} steps, seeds {args.seeds}; "
          f"estimated wall time: ~{est / 60:.0f} min (2 shared CPU cores, 1 thread; an idle machine is faster)", flush=True)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    work = Path(args.work_dir or REPO / "outputs" / "stage_ablation" / preset).resolve()
    settings = {k: v for k, v in vars(args).items() if k not in ("work_dir", "out", "threads", "fresh", "quick", "seeds", "bootstrap")}
    stamp = work / "settings.json"
    if args.fresh or (stamp.is_file() and json.loads(stamp.read_text()) != settings):
        print(f"[stage_ablation] settings changed (or --fresh): clearing {work}")
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(settings, indent=2) + "\n")

    t_start = time.perf_counter()
    data_dir = work / "data"
    counts_file = work / "subset.json"
    if not counts_file.is_file():
        counts = write_subset(src, data_dir, args.datasets, {"train": args.train, "dev": args.dev, "test": args.test},
                              args.max_words, args.data_seed)
        counts_file.write_text(json.dumps(counts, indent=2) + "\n")
    subset = json.loads(counts_file.read_text())

    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        from prouie_pl.tiny_model import build_tiny_model

        t0 = time.perf_counter()
        print(f"[stage_ablation] building the tiny model on {data_dir} ({args.pretrain_steps} pre-training steps)", flush=True)
        tmp = work / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_model(tmp, corpus=data_dir, pretrain_steps=args.pretrain_steps, seed=args.data_seed)
        (tmp / "build_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
        tmp.rename(model_dir)
    pre = json.loads((model_dir / "pretraining.json").read_text()) if (model_dir / "pretraining.json").is_file() else {}
    build_s = float((model_dir / "build_seconds.txt").read_text()) if (model_dir / "build_seconds.txt").is_file() else float("nan")
    cfg_json = json.loads((model_dir / "config.json").read_text())
    n_params = (model_dir / "model.safetensors").stat().st_size // 4  # fp32 weights (plus a small header)

    phases = curriculum_check(data_dir, args.batch_size, plan)
    cfgs = stage_configs(work / "configs", model_dir, data_dir, args)
    hp = stage_hyperparameters(cfgs)

    results: dict[str, dict[int, dict]] = {a: {} for a in ARMS}
    extra: dict[str, dict[int, dict]] = {"CM part of CM+SA": {}, "CM+SA part of CM+SA+DE": {}}
    per_record: dict[str, list] = {a: [] for a in [*ARMS, *extra]}
    stage_seconds: dict[str, float] = {}
    for seed in args.seeds:
        base = work / f"seed{seed}"
        for arm in ARMS:
            arm_dir = base / arm.replace("+", "_")
            pipe = pipeline_yaml(base / "pipelines" / f"{arm.replace('+', '_')}.yaml", cfgs, plan[arm], seed,
                                 args.mixed_format if arm == "mixed" else None)
            run_arm(arm, arm_dir, pipe, base / "CM_SA" if arm == "CM+SA+DE" else None)
            last = list(plan[arm])[-1]
            results[arm][seed] = read_report(arm_dir / last)
            per_record[arm].append(record_counts(data_dir, arm_dir / last))
            for s in plan[arm]:
                info = json.loads((arm_dir / s / "stage.json").read_text())
                if "reused_from" not in info:
                    stage_seconds[f"seed {seed} {arm} {s.upper()} ({plan[arm][s]} steps, with test decoding)"] = info["seconds"]
        for name, stage_dir in (("CM part of CM+SA", base / "CM_SA" / "cm"), ("CM+SA part of CM+SA+DE", base / "CM_SA_DE" / "sa")):
            extra[name][seed] = read_report(stage_dir)
            per_record[name].append(record_counts(data_dir, stage_dir))
    total = time.perf_counter() - t_start
    boot = bootstrap({a: per_record[a] for a in ARMS}, args.bootstrap)
    empty = {name: [sum(1 for recs in per_ds.values() for rec in recs if sum(c[0] + c[1] for c in rec.values()) == 0) for per_ds in v]
             for name, v in per_record.items()}
    grpo = grpo_trace(work / f"seed{args.seeds[0]}" / "CM_SA_DE" / "de")

    # ---------------------------------------------------------------- tables
    from prouie_pl.scoring import task_scores

    first = results["CM"][args.seeds[0]]
    cols = columns(first)
    keys = [f"{m} {ds}" for m, ds in cols] + [f"task {t}" for t in task_scores(first)] + ["overall"]
    headers_keys = [f"{METRIC_NAMES.get(m, m)} {ds}" for m, ds in cols] + [f"{t} (task avg)" for t in task_scores(first)] + ["overall"]

    def steps_str(steps: dict) -> str:
        return " + ".join(f"{s.upper()} {n}" for s, n in steps.items())

    def table(rows_src: dict, plans: dict, with_ci: bool) -> str:
        rows = []
        for name, per_seed in rows_src.items():
            scored = [row_scores(r, cols) for r in per_seed.values()]
            row = [name, plans[name]] + [fmt_mean([s.get(k, float("nan")) for s in scored]) for k in keys]
            if with_ci:
                b = boot[name]
                row.append(f"{b['ci'][0]:.1f} – {b['ci'][1]:.1f}")
                row.append("-" if name == "CM" else f"{b['diff_ci'][0]:+.1f} – {b['diff_ci'][1]:+.1f}")
            row += [fmt_mean([float(x) for x in empty[name]], 0), fmt_mean([float(s["parse failures"]) for s in scored], 0),
                    fmt_mean([float(s["truncated"]) for s in scored], 0)]
            rows.append(row)
        headers = ["arm", "optimizer steps"] + headers_keys + (["overall 95% CI", "overall − CM, 95% CI"] if with_ci else []) + ["no units", "parse fail.", "truncated"]
        return markdown_table(headers, rows)

    main_plans = {a: steps_str(plan[a]) + (f" (schedule mixed, {args.mixed_format} format)" if a == "mixed" else "") for a in ARMS}
    main_table = table(results, main_plans, True)
    extra_plans = {"CM part of CM+SA": steps_str({"cm": plan["CM+SA"]["cm"]}),
                   "CM+SA part of CM+SA+DE": steps_str({k: plan["CM+SA+DE"][k] for k in ("cm", "sa")})}
    extra_table = table(extra, extra_plans, False)

    n_test = {k.rsplit("/", 1)[0]: v["written"] for k, v in subset.items() if k.endswith("/test")}
    gold = {f"{METRIC_NAMES.get(m, m)} {ds}": first["tasks"][m]["datasets"][ds]["tp"] + first["tasks"][m]["datasets"][ds]["fn"] for m, ds in cols}
    n_outputs = sum(n_test.values())
    print(main_table)

    subset_lines = "\n".join(f"  - {k}: {v['written']} of the {v['eligible']} sentences with at most {args.max_words} words ({v['all']} in the split)"
                             for k, v in subset.items())
    timing_lines = "\n".join(f"- {k}: {v / 60:.1f} min" for k, v in stage_seconds.items())
    seeds_note = ("one training seed, so each cell is a single run" if len(args.seeds) == 1
                  else f"mean ± standard deviation over training seeds {', '.join(map(str, args.seeds))}")
    body = f"""Command: `python bench/stage_ablation.py {' '.join(argv)}` ({preset} setting).
Wall time of base model and stages (as recorded when they ran) {(build_s + sum(stage_seconds.values())) / 60:.1f} min;
this invocation {total / 60:.1f} min (stages already finished in the work folder are reused, not rerun); the
estimate printed at start was ~{est / 60:.0f} min.

## Setup

- Data: seeded random subset (`--data-seed {args.data_seed}`) of {', '.join(args.datasets)} from `{src}`,
  sentences of at most {args.max_words} words only:
{subset_lines}
- Base model: tiny Llama ({cfg_json['num_hidden_layers']} layers, hidden {cfg_json['hidden_size']}, about
  {n_params / 1e6:.1f}M parameters) with a {cfg_json['vocab_size']}-token byte-level BPE tokenizer, both built from
  scratch on the subset's training split with `build_tiny_model` ({args.pretrain_steps} steps of plain LM
  pre-training, loss {pre.get('first_loss', float('nan')):.2f} -> {pre.get('last_loss', float('nan')):.2f};
  {build_s / 60:.1f} min).  Dev and test sentences are never trained on.
- Training: LoRA with the shipped `configs/tiny/*.yaml` settings (r {hp['r']}; peak lr {hp['cm']:g} CM, {hp['sa']:g} SA with
  warm-up and cosine decay over each stage's own steps; {hp['de']:g} constant for GRPO), SFT batch {args.batch_size},
  GRPO 4 prompts x 4 completions per step, stepwise rewards.  Every stage runs exactly its `trainer.max_steps`:
  no validation passes, no early stopping; each stage hands on its last adapter (`adapter: last`).
- Budget B = {args.budget} optimizer steps per arm.  CM: cumulative curriculum NER -> NER+RE -> NER+RE+EE in the
  full format, one epoch each for the first two phases (steps per epoch {json.dumps(phases['steps_per_epoch'])}),
  so the last phase starts at step {phases['last_phase_start']} and runs until the CM budget ends.  SA: stratified
  sample of {args.sa_per_dataset} training records per data set, concise format.  DE: prompts from a stratified
  sample of {args.de_per_dataset} records per data set.  The CM+SA+DE arm reuses the CM stage of the CM+SA arm
  (same config and seed) and takes its {args.de_steps} GRPO steps out of the SA share: **one GRPO step counts as
  one step of B** although it costs far more compute than an SFT step (16 sampled completions, scored and
  back-propagated).  The mixed arm trains all three tasks shuffled together from the first step.
- Scores: test F1 in percent (strict scorer: exact strings, case- and space-normalised), greedy decoding, at most
  {args.max_new_tokens_full} new tokens in the full format and {args.max_new_tokens_concise} in the concise one;
  {seeds_note}.  Test sentences per data set {json.dumps(n_test)}; gold units per metric {json.dumps(gold)}.
  "overall" is the project's summary score (mean of NER, RE strict, and the mean of EE trigger and argument).
  The 95% intervals come from a paired bootstrap over test sentences ({args.bootstrap} resamples within each data
  set, the same draws for every arm): they show test-sample noise only, not the spread over training seeds.
  Of the {n_outputs} test outputs per arm, "no units" counts those that predict nothing at all (an empty answer or
  one the parser recovered no unit from), "parse fail." those the parser could not read cleanly, "truncated"
  those cut at the token limit.

## Test F1 at a budget of {args.budget} optimizer steps

{main_table}

Intermediate stages of the staged arms (scored after that stage; not equal-budget rows):

{extra_table}

## What this can and cannot show

{honesty(args, results, boot, gold, n_outputs, n_params, empty, grpo, hp)}

## Wall time per stage

Each stage's time includes decoding and scoring its test split; a stage resumed after an interruption counts only
its last attempt.  Base model: {build_s / 60:.1f} min.

{timing_lines}
"""
    write_result("stage_ablation.md", "Stage ablation: CM / CM+SA / CM+SA+DE / mixed SFT at one step budget (tiny model, CPU)",
                 body, args.out)
    (work / "summary.json").write_text(json.dumps({"plan": plan, "bootstrap": boot, "stage_seconds": stage_seconds,
                                                   "results": {a: {s: row_scores(r, cols) for s, r in v.items()} for a, v in results.items()}},
                                                  indent=2, default=str) + "\n")
    return 0


def grpo_trace(de_dir: Path) -> dict:
    """First and last logged completion length, reward and zero-spread share of the GRPO stage."""
    from prouie_pl.reports import latest_metrics

    rows = [r for r in latest_metrics(de_dir) if r.get("train/completion_length")]
    if not rows:
        return {}
    pick = lambda r: {k: float(r[f"train/{k}"]) for k in ("completion_length", "reward", "zero_spread_groups", "f1") if r.get(f"train/{k}")}  # noqa: E731
    return {"first": pick(rows[0]), "last": pick(rows[-1]), "first_step": int(rows[0]["step"]), "last_step": int(rows[-1]["step"])}


def honesty(args, results, boot, gold, n_outputs, n_params, empty, grpo, hp) -> str:
    from prouie_pl.scoring import overall_f1, task_scores

    def mean_over_seeds(per_seed: dict, fn) -> float:
        return statistics.mean(fn(r) for r in per_seed.values())

    overall = {a: mean_over_seeds(results[a], overall_f1) for a in ARMS}
    tasks = {a: {t: mean_over_seeds(results[a], lambda r, t=t: task_scores(r).get(t, 0.0)) for t in ("NER", "RE", "EE")} for a in ARMS}
    parse = {a: mean_over_seeds(results[a], lambda r: row_scores(r, columns(r))["parse failures"]) for a in ARMS}
    lines = []
    lines.append(
        f"What was measured: for one tiny base model built from scratch and one small subset of real data, which way of "
        f"spending {args.budget} LoRA optimizer steps gives the best test F1 on {args.test} short test sentences per data "
        f"set.  That is all.  The model has ~{n_params / 1e6:.1f}M parameters and no prior knowledge "
        f"of language, entity types, relations or events beyond {args.pretrain_steps} pre-training steps on the same "
        "training sentences, so this says nothing about how the stages behave on a 7B instruction-tuned base, for which ProUIE's "
        "claims are made.")
    if max(overall.values()) == 0.0:
        lines.append(
            f"Every arm scores 0 here: at {args.budget} steps no adapter has learned to emit correct structures yet "
            f"(parse failures per arm: {', '.join(f'{a} {parse[a]:.0f}' for a in ARMS)} of {n_outputs} outputs).  This run "
            "checks that the four arms, the step accounting and the scoring run end to end on real data; it measures "
            "nothing about the stages.")
        return "\n\n".join(lines)
    ranked = sorted(ARMS, key=lambda a: -overall[a])
    lines.append(
        "Overall scores: " + ", ".join(f"{a} {overall[a]:.1f}" for a in ranked) + ".  Per task (NER / RE / EE): "
        + "; ".join(f"{a} {tasks[a]['NER']:.1f} / {tasks[a]['RE']:.1f} / {tasks[a]['EE']:.1f}" for a in ARMS) + ".")
    sep = []
    for a in ARMS:
        if a == "CM":
            continue
        lo, hi = boot[a]["diff_ci"]
        verdict = "above" if lo > 0 else "below" if hi < 0 else "not distinguishable from"
        sep.append(f"{a} is {verdict} CM (difference {lo:+.1f} to {hi:+.1f})")
    lines.append(
        "Against the CM-only arm, with 95% bootstrap intervals over test sentences: " + "; ".join(sep) + ".  These "
        f"intervals ignore training-seed noise{' (one seed was run)' if len(args.seeds) == 1 else ''}, which on a model "
        "this small is often as large, so a difference of a few points should not be read as a finding.  Smallest "
        f"gold counts per cell: {min(gold.values())} units.")
    de_empty = statistics.mean(empty["CM+SA+DE"])
    before_de = statistics.mean(empty["CM+SA part of CM+SA+DE"])
    if grpo and de_empty >= max(0.1 * n_outputs, 1.5 * before_de):
        f, l = grpo["first"], grpo["last"]
        len0, len1 = f.get("completion_length", float("nan")), l.get("completion_length", float("nan"))
        z0, z1 = f.get("zero_spread_groups", float("nan")), l.get("zero_spread_groups", float("nan"))
        text = (f"After its GRPO steps {de_empty:.0f} of {n_outputs} test answers of the CM+SA+DE arm predict nothing, "
                f"against {before_de:.0f} before DE.  In training the mean completion length went from {len0:.1f} tokens "
                f"(step {grpo['first_step']}) to {len1:.1f} (step {grpo['last_step']}), and the share of prompt groups with "
                f"no reward spread from {z0:.2f} to {z1:.2f}.")
        if de_empty >= 0.5 * n_outputs and len1 < len0:
            text += ("  DE collapsed towards empty answers.  Under the stepwise rewards an empty answer earns the "
                     "clean-finish bonus and loses only the gold units it misses, while every wrong unit costs a further "
                     "-1, so for a policy whose units are almost all wrong the empty answer has the best expected reward; "
                     "once every completion in a group is the same the advantages are zero and GRPO stops learning.  This "
                     "is what the tiny setting shows about DE, not evidence against DE on a capable SA model.")
        else:
            text += (f"  {args.de_steps} GRPO steps at this scale move the greedy answers of a weak policy a lot, in either "
                     "direction; the test answers are decoded greedily while training samples at temperature 1, so the "
                     "two need not move together.")
        lines.append(text)
    lines.append(
        "Confounds built into the comparison: SA changes the output format (full -> concise), the learning rate and "
        "its schedule (each stage warms up and decays anew) and the data (a sample), so CM+SA vs CM mixes all of these; "
        f"the {args.de_steps} GRPO steps of CM+SA+DE are taken from SA, are counted 1:1 in the step budget although each "
        f"costs roughly as much compute as dozens of SFT steps, and run at a constant learning rate of {hp['de']:g}, so "
        "CM+SA vs CM+SA+DE mostly measures whether a few policy-gradient steps on a weak policy help or hurt more than "
        "the SA steps they replace.  GRPO needs completions with some reward spread; a tiny model that rarely gets a "
        "unit right gives it little signal.  The curriculum vs mixed comparison is the cleanest of the three (same "
        "format, learning rate, data and steps; only the order of the tasks differs), yet at this scale it mainly "
        "reflects how much of the budget each task gets: the curriculum spends its first epochs on NER alone and "
        "NER+RE, so EE sees fewer steps than under mixed training.")
    return "\n\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
