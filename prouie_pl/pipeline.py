"""``python -m prouie_pl pipeline``: CM -> SA -> DE in one output folder.

Each stage is an ordinary ``fit`` config (the same YAML ``python -m prouie_pl fit`` takes) run with its
``default_root_dir`` set to ``DIR/<stage>`` and, for SA and DE, ``model.lora.init_adapter`` set to the
adapter the previous stage handed on (``adapter: best`` picks the best-by-``val/f1`` one, ``last`` the final
one).  After each stage the test split is decoded and scored into ``DIR/<stage>/{predictions.jsonl,
report.json}``, and ``DIR/<stage>/stage.json`` records what was run, from which adapter, and the result.

A stage with a ``stage.json`` is skipped on a later run; ``--restart_from STAGE`` deletes that stage and the
ones after it and runs them again; a stage interrupted mid-way resumes from ``DIR/<stage>/checkpoints/last.ckpt``.
At the end ``DIR/report.md``, PNG plots and a rich table say what each stage bought.

The pipeline YAML::

    stages:                 # stage -> fit config (path relative to the pipeline YAML or the working folder)
      cm: cm.yaml
      sa: sa.yaml
      de: de.yaml
    overrides:              # optional: dotted fit options applied to every stage
      data.data_dir: demo
    stage_overrides:        # optional: per stage
      de: {trainer.max_steps: 20}
    adapter: best           # best | last
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml

STAGES = ("cm", "sa", "de")
DONE = "stage.json"


def adapter_checksum(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(folder).glob("adapter_model.*")):
        h.update(p.read_bytes())
    return h.hexdigest()


def _resolve(path: str, base: Path) -> str:
    p = Path(path)
    if p.is_absolute() or p.is_file():
        return str(p)
    q = base / p
    if q.is_file():
        return str(q)
    raise FileNotFoundError(f"stage config {path!r} not found (looked in the working folder and {base})")


def load_pipeline_config(path: str) -> dict:
    from .config_files import embedded_configs, resolve_config

    p = Path(resolve_config(path))
    if not p.is_file():
        names = ", ".join(n for n in embedded_configs() if n.endswith("pipeline.yaml") or "pipeline_" in n)
        raise FileNotFoundError(f"pipeline config {path!r} is neither a file nor a shipped config (shipped: {names})")
    cfg = yaml.safe_load(p.read_text()) or {}
    unknown = set(cfg) - {"stages", "overrides", "stage_overrides", "adapter"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; a pipeline config has stages, overrides, stage_overrides, adapter")
    stages = cfg.get("stages") or {}
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"{path}: 'stages' must map some of {', '.join(STAGES)} to fit configs (got {sorted(stages) or 'nothing'})")
    if cfg.get("adapter", "best") not in ("best", "last"):
        raise ValueError(f"{path}: 'adapter' must be best or last, not {cfg.get('adapter')!r}")
    cfg["stages"] = {s: _resolve(stages[s], p.parent) for s in STAGES if s in stages}
    cfg.setdefault("overrides", {})
    cfg.setdefault("stage_overrides", {})
    cfg.setdefault("adapter", "best")
    return cfg


def _override_args(overrides: dict) -> list[str]:
    args = []
    for k, v in overrides.items():
        args += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return args


def run_stage(stage: str, config_path: str, stage_dir: Path, init_adapter: Optional[str], overrides: dict, choose: str) -> dict:
    """Fit one stage (resuming if a checkpoint is there), pick its adapter, decode and score the test split."""
    from .lightning_cli import build_cli

    t0 = time.perf_counter()
    args = ["--config", config_path, "--trainer.default_root_dir", str(stage_dir)] + _override_args(overrides)
    if init_adapter:
        args += ["--model.init_args.lora.init_adapter", init_adapter]
    cli = build_cli(args, run=False)
    last = stage_dir / "checkpoints" / "last.ckpt"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if last.is_file() else None)
    if cli.trainer.interrupted:
        raise KeyboardInterrupt
    best = stage_dir / "adapter_best"
    chosen = best if choose == "best" and best.is_dir() else stage_dir / "adapter"
    cli.model.load_adapter_weights(str(chosen))
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    report = json.loads((stage_dir / "report.json").read_text())
    info = {
        "stage": stage,
        "config": config_path,
        "overrides": overrides,
        "init_adapter": init_adapter,
        "init_adapter_checksum": adapter_checksum(Path(init_adapter)) if init_adapter else None,
        "adapter": str(chosen),
        "adapter_checksum": adapter_checksum(chosen),
        "test_overall_f1": report.get("overall_f1"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (stage_dir / DONE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def run_pipeline(config: str, out_dir: str, restart_from: Optional[str] = None, extra: Optional[dict] = None) -> dict:
    from .reports import load_reports, make_plots, print_summary, write_markdown

    cfg = load_pipeline_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = list(cfg["stages"])
    if restart_from is not None:
        if restart_from not in stages:
            raise ValueError(f"--restart_from {restart_from!r} is not a stage of {config} ({', '.join(stages)})")
        for s in stages[stages.index(restart_from):]:
            shutil.rmtree(out / s, ignore_errors=True)
    prev_adapter: Optional[str] = None
    infos = {}
    for s in stages:
        stage_dir = out / s
        done = stage_dir / DONE
        if done.is_file():
            infos[s] = json.loads(done.read_text())
            print(f"[prouie] pipeline: {s} already finished in {stage_dir}, skipped")
        else:
            overrides = {**cfg["overrides"], **(extra or {}), **cfg["stage_overrides"].get(s, {})}
            print(f"[prouie] pipeline: running {s} in {stage_dir}" + (f" from {prev_adapter}" if prev_adapter else ""))
            infos[s] = run_stage(s, cfg["stages"][s], stage_dir, prev_adapter, overrides, cfg["adapter"])
        prev_adapter = infos[s]["adapter"]
    reports = load_reports(out, stages)
    plots = make_plots(out, reports, stages)
    write_markdown(out, reports, plots, {s: i.get("seconds", 0.0) for s, i in infos.items()})
    (out / "pipeline.json").write_text(json.dumps({"config": config, "stages": infos}, indent=2) + "\n")
    print_summary(reports)
    print(f"[prouie] pipeline report: {out / 'report.md'}")
    return infos


def pipeline_main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m prouie_pl pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiny/pipeline.yaml", help="pipeline YAML (default: the embedded tiny demo)")
    ap.add_argument("--out_dir", default="outputs/pipeline", help="output folder (one sub-folder per stage)")
    ap.add_argument("--restart_from", choices=STAGES, default=None, help="delete this stage and the later ones, then run them again")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra fit options for every stage, e.g. data.max_val_records=8")
    args = ap.parse_args(list(argv))
    extra = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        extra[k] = v
    run_pipeline(args.config, args.out_dir, args.restart_from, extra)
    return 0
