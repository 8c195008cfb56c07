"""``python -m prouie_pl pipeline``: CM -> SA -> DE in one output folder.

Each stage is an ordinary ``fit`` config (the same YAML ``python -m prouie_pl fit`` takes) run with its
``default_root_dir`` set to ``DIR/<stage>`` and, for SA and DE, ``model.lora.init_adapter`` set to the
adapter the previous stage handed on (``adapter: best`` picks the best-by-``val/f1`` one, ``last`` the final
one).  After each stage the test split is decoded and scored into ``DIR/<stage>/{predictions.jsonl,
report.json}``, and ``DIR/<stage>/stage.json`` records what was run, from which adapter, what it cost (wall
seconds, optimizer steps, training tokens, GRPO completions sampled), the result, blank answers and example
predictions.  With ``zero_shot: true`` the base model is scored first, in ``DIR/zero_shot/``.

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
    stage_overrides:        # optional: per stage (zero_shot: for the zero-shot decode, else the first stage's)
      de: {trainer.max_steps: 20}
    adapter: best           # best | last
    zero_shot: true         # optional: score the base model before any training (prompts of the first stage)
    test_dtype: float32     # optional: same | float32 -- decode the test split with the frozen base cast to
                            # float32 (a bf16 base trains faster on some CPUs but decodes slower there)
    extract_demo: demo      # optional: run the final adapter with ``extract`` on a paragraph (a YAML file
                            # with ``text`` and ``schema``; ``demo``: the shipped one) and end the report with it
    expected_seconds:       # optional: what each stage took on a reference machine; the progress line scales
      cm: 225               # them by this machine's pace so far to estimate the time left for the whole run
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Optional, Union

from .memory import peak_rss_mb, trim_heap


STAGES = ("cm", "sa", "de")
ZERO_SHOT = "zero_shot"
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
    """A pipeline YAML read through the pipeline command's own parser (``python -m prouie_pl pipeline --config``)."""
    from .cli import build_parser, pipeline_settings
    from .config_files import embedded_configs, resolve_config

    p = Path(resolve_config(path))
    if not p.is_file():
        names = ", ".join(n for n in embedded_configs() if n.endswith("pipeline.yaml") or "pipeline_" in n)
        raise FileNotFoundError(f"pipeline config {path!r} is neither a file nor a shipped config (shipped: {names})")
    cfg = build_parser().parse_args(["pipeline", "--config", str(p)])
    return pipeline_settings(cfg.pipeline)


def check_pipeline_config(cfg: dict, where: str, base: Path) -> dict:
    """Check pipeline settings (``where`` names them in errors) and resolve the stage configs against ``base``,
    the pipeline YAML's folder."""
    stages = cfg.get("stages") or {}
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"{where}: 'stages' must map some of {', '.join(STAGES)} to fit configs (got {sorted(stages) or 'nothing'})")
    bad = sorted(set(cfg.get("stage_overrides") or {}) - set(STAGES) - {ZERO_SHOT})
    if bad:
        raise ValueError(f"{where}: stage_overrides for unknown stages {bad} (stages: {', '.join(STAGES)}, {ZERO_SHOT})")
    bad = sorted(set(cfg.get("expected_seconds") or {}) - set(STAGES) - {ZERO_SHOT})
    if bad:
        raise ValueError(f"{where}: expected_seconds for unknown stages {bad} (stages: {', '.join(STAGES)}, {ZERO_SHOT})")
    out = dict(cfg)
    out["stages"] = {s: _resolve(stages[s], base) for s in STAGES if s in stages}
    out["overrides"] = dict(cfg.get("overrides") or {})
    out["stage_overrides"] = {k: dict(v) for k, v in (cfg.get("stage_overrides") or {}).items()}
    out["path"] = where
    return out


def _override_args(overrides: dict) -> list[str]:
    args = []
    for k, v in overrides.items():
        args += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return args


def _test_decode(cli, test_dtype: str) -> tuple[float, "EvalResult"]:
    """Decode and score the test split; return the seconds it took and what the generation evaluator scored."""
    import lightning as L
    import torch

    from .callbacks import GenerationEvaluator
    from .modeling import cast_frozen_base

    class CastBase(L.Callback):  # the model is built in ``setup``, so cast once it exists
        def on_test_start(self, trainer, pl_module):
            cast_frozen_base(pl_module.model, torch.float32)

    if test_dtype == "float32":
        cli.trainer.callbacks.append(CastBase())
    release_memory()  # the heap pages training freed: glibc keeps them otherwise, under decoding's own peak
    t0 = time.perf_counter()
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    seconds = round(time.perf_counter() - t0, 1)
    evaluator = next((c for c in cli.trainer.callbacks if isinstance(c, GenerationEvaluator)), None)
    if evaluator is None or evaluator.last_result is None or evaluator.last_result.split != "test":
        raise RuntimeError("trainer.test left no test result (it comes from the trainer's GenerationEvaluator callback)")
    return seconds, evaluator.last_result


def answer_summary(result: "EvalResult", records, per_task: int = 2) -> dict:
    """Blank and structure-less answers on the test split, and ``per_task`` example predictions per task.

    The examples are the same sentences at every stage (the lowest record indices of each task's first data
    set), so a reader can follow one sentence through the stages."""
    from .formats import render_target
    from .results import answer_problem

    by_uid = {r.uid: r for r in records}
    blank = no_units = 0
    examples: dict[str, list] = {}
    for uid, out in sorted((p.uid, p.output or "") for p in result.predictions):
        rec = by_uid.get(uid)
        problem = answer_problem(out, rec)
        blank += problem == "blank"
        no_units += problem == "no structures"
        items = examples.setdefault(uid[0], [])
        if rec is None or len(items) >= per_task or (items and items[0]["dataset"] != rec.dataset):
            continue
        items.append({"dataset": rec.dataset, "index": rec.index, "sentence": rec.sentence,
                      "gold": render_target(rec, "concise"), "prediction": out})
    return {"answers": len(result.predictions), "blank_answers": blank, "answers_without_structures": no_units, "examples": examples}


def sentence_counts(result: "EvalResult", records) -> dict:
    """Each test sentence's strict (tp, fp, fn) per data set and metric, in the predictions' order (task, data
    set, index), as JSON: what the report's bootstrap intervals resample."""
    from .intervals import counts_to_json, per_sentence_counts

    by_uid = {r.uid: r for r in records}
    pairs = [(by_uid[p.uid], p.output) for p in result.predictions if p.uid in by_uid]
    return counts_to_json(per_sentence_counts([r for r, _ in pairs], [o for _, o in pairs]))


def release_memory() -> None:
    """Give a finished stage's model, optimizer and trainer back before the next stage builds its own (and
    training's freed heap pages back before test decoding): break the reference cycles Lightning leaves
    (trainer <-> module <-> callbacks), then trim the heap (:mod:`prouie_pl.memory`)."""
    trim_heap(collect=True)


def _finish(stage_dir: Path, records, info: dict, result: "EvalResult", t0: float) -> tuple[dict, "EvalResult"]:
    info.update(answer_summary(result, records))
    info["truncated_answers"] = result.truncated
    info["sentence_counts"] = sentence_counts(result, records)
    info["test_overall_f1"] = result.overall_f1
    info["seconds"] = round(time.perf_counter() - t0, 1)
    info["peak_rss_mb"] = peak_rss_mb()
    (stage_dir / DONE).write_text(json.dumps(info, indent=2) + "\n")
    return info, result


def run_zero_shot(config_path: str, stage_dir: Path, overrides: dict, test_dtype: str, progress=None) -> tuple[dict, "EvalResult"]:
    """The base model before any training (a fresh LoRA adapter is the identity), same prompts as ``config_path``.

    Returns what ``stage.json`` holds and the test result."""
    from .callbacks import StageCost
    from .lightning_cli import build_cli

    t0 = time.perf_counter()
    args = ["--config", config_path, "--trainer.default_root_dir", str(stage_dir)] + _override_args(overrides)
    args += ["--model.init_args.lora.init_adapter", "null"]
    cli = build_cli(args, run=False)
    if progress is not None:
        cli.trainer.callbacks.append(progress)
    info = {"stage": ZERO_SHOT, "config": config_path, "overrides": overrides, "init_adapter": None,
            "cost": StageCost().summary()}  # nothing trained
    info["test_seconds"], result = _test_decode(cli, test_dtype)
    return _finish(stage_dir, cli.datamodule.test_records, info, result, t0)


def run_stage(stage: str, config_path: str, stage_dir: Path, init_adapter: Optional[str], overrides: dict, choose: str,
              test_dtype: str = "same", progress=None) -> tuple[dict, "EvalResult"]:
    """Fit one stage (resuming if a checkpoint is there), pick its adapter, decode and score the test split.

    Returns what ``stage.json`` holds and the test result."""
    from .callbacks import StageCost
    from .lightning_cli import build_cli

    t0 = time.perf_counter()
    args = ["--config", config_path, "--trainer.default_root_dir", str(stage_dir)] + _override_args(overrides)
    if init_adapter:
        args += ["--model.init_args.lora.init_adapter", init_adapter]
    cli = build_cli(args, run=False)
    if progress is not None:  # the pipeline's one line per stage (StageProgress)
        cli.trainer.callbacks.append(progress)
    cost = next((c for c in cli.trainer.callbacks if isinstance(c, StageCost)), None)
    if cost is None:
        cost = StageCost()
        cli.trainer.callbacks.append(cost)
    last = stage_dir / "checkpoints" / "last.ckpt"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if last.is_file() else None)
    if cli.trainer.interrupted:
        raise KeyboardInterrupt
    best = stage_dir / "adapter_best"
    chosen = best if choose == "best" and best.is_dir() else stage_dir / "adapter"
    cli.model.load_adapter_weights(str(chosen))
    info = {
        "stage": stage,
        "config": config_path,
        "overrides": overrides,
        "init_adapter": init_adapter,
        "init_adapter_checksum": adapter_checksum(Path(init_adapter)) if init_adapter else None,
        "adapter": str(chosen),
        "adapter_checksum": adapter_checksum(chosen),
        "cost": cost.summary(),
    }
    info["test_seconds"], result = _test_decode(cli, test_dtype)
    return _finish(stage_dir, cli.datamodule.test_records, info, result, t0)


def load_extract_demo(spec: str) -> dict:
    """``text`` and ``schema`` of an ``extract_demo`` file (``demo``: the shipped paragraph)."""
    import yaml

    path = Path(__file__).parent / "demo_data" / "extract_demo.yaml" if spec == "demo" else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"extract_demo: {spec!r} is neither 'demo' nor a YAML file")
    obj = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not isinstance(obj.get("schema"), dict):
        raise ValueError(f"extract_demo {path}: needs 'text' (a string) and 'schema' (entities / relations / events)")
    return {"path": str(path), "text": obj["text"], "schema": obj["schema"]}


def run_extract_demo(adapter: str, spec: str, target_format: Optional[str] = None) -> dict:
    """The final adapter run on the demo paragraph as ``extract`` runs it: what the report's last section shows."""
    from .extractor import Extractor

    demo = load_extract_demo(spec)
    t0 = time.perf_counter()
    ex = Extractor.from_pretrained(adapter, device="cpu", target_format=target_format)
    doc = ex.extract(demo["text"], demo["schema"])
    found = [{"kind": "entity", "type": e.type, "text": e.text, "start": e.start, "end": e.end, "score": e.score} for e in doc.entities]
    found += [{"kind": "relation", "type": r.type, "text": f"{r.head.text} -> {r.tail.text}", "start": r.head.start,
               "end": r.tail.end, "score": r.score} for r in doc.relations]
    for e in doc.events:
        found.append({"kind": "event trigger", "type": e.type, "text": e.trigger.text, "start": e.trigger.start, "end": e.trigger.end,
                      "score": e.score})
        found += [{"kind": f"argument ({a.role})", "type": e.type, "text": a.text, "start": a.start, "end": a.end, "score": a.score}
                  for a in e.arguments]
    fmt = ex.format
    del ex
    given = f" --format {target_format}" if target_format else ""  # else the adapter's answer_format.json decides
    return {"command": f"python -m prouie_pl extract --model {adapter}{given} --schema {demo['path']}", "format": fmt,
            "text": demo["text"], "schema": demo["schema"], "json": json.dumps(doc.to_json(), ensure_ascii=False),
            "found": found, "seconds": round(time.perf_counter() - t0, 1)}


def run_pipeline(config: Union[str, dict], out_dir: str, restart_from: Optional[str] = None, extra: Optional[dict] = None) -> dict:
    """Run the stages of ``config`` (a pipeline YAML, or settings from :func:`load_pipeline_config`) in ``out_dir``."""
    from .reports import make_plots, print_summary, write_markdown
    from .results import EvalResult

    cfg = config if isinstance(config, dict) else load_pipeline_config(config)
    config = cfg["path"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = list(cfg["stages"])
    if restart_from is not None:
        if restart_from not in stages:
            raise ValueError(f"--restart_from {restart_from!r} is not a stage of {config} ({', '.join(stages)})")
        for s in stages[stages.index(restart_from):]:
            shutil.rmtree(out / s, ignore_errors=True)
    infos, results = {}, {}
    from .callbacks import StageProgress
    from .reports import STAGE_NAMES

    order = ([ZERO_SHOT] if cfg["zero_shot"] else []) + stages
    expected = {k: float(v) for k, v in (cfg.get("expected_seconds") or {}).items()}
    run_start = time.perf_counter()

    def progress(stage: str) -> StageProgress:
        k = order.index(stage)

        def later() -> Optional[float]:
            rest = order[k + 1:]
            if not rest:
                return 0.0
            if any(s not in expected for s in rest):
                return None
            done = [s for s in order[:k] if s in expected and s in infos]
            pace = sum(float(infos[s].get("seconds", 0.0)) for s in done) / sum(expected[s] for s in done) if done else 1.0
            return pace * sum(expected[s] for s in rest)

        return StageProgress(STAGE_NAMES.get(stage, stage), (k + 1, len(order)), run_start, later)

    if cfg["zero_shot"]:
        done = out / ZERO_SHOT / DONE
        if done.is_file():
            infos[ZERO_SHOT], results[ZERO_SHOT] = json.loads(done.read_text()), EvalResult.load(out / ZERO_SHOT)
            print(f"[prouie] pipeline: zero-shot already scored in {out / ZERO_SHOT}, skipped")
        else:
            print(f"[prouie] pipeline: scoring the base model zero-shot in {out / ZERO_SHOT}")
            own = cfg["stage_overrides"].get(ZERO_SHOT, cfg["stage_overrides"].get(stages[0], {}))
            overrides = {**cfg["overrides"], **(extra or {}), **own}
            infos[ZERO_SHOT], results[ZERO_SHOT] = run_zero_shot(cfg["stages"][stages[0]], out / ZERO_SHOT, overrides, cfg["test_dtype"],
                                                                 progress(ZERO_SHOT))
            release_memory()
    prev_adapter: Optional[str] = None
    for s in stages:
        stage_dir = out / s
        done = stage_dir / DONE
        if done.is_file():
            infos[s], results[s] = json.loads(done.read_text()), EvalResult.load(stage_dir)
            print(f"[prouie] pipeline: {s} already finished in {stage_dir}, skipped")
        else:
            overrides = {**cfg["overrides"], **(extra or {}), **cfg["stage_overrides"].get(s, {})}
            print(f"[prouie] pipeline: running {s} in {stage_dir}" + (f" from {prev_adapter}" if prev_adapter else ""))
            infos[s], results[s] = run_stage(s, cfg["stages"][s], stage_dir, prev_adapter, overrides, cfg["adapter"], cfg["test_dtype"],
                                             progress(s))
            release_memory()
        prev_adapter = infos[s]["adapter"]
    extraction = None
    if cfg.get("extract_demo"):
        last = stages[-1]
        saved = out / "extract_demo.json"
        key = {"adapter_checksum": infos[last].get("adapter_checksum"), "spec": cfg["extract_demo"]}
        old = json.loads(saved.read_text()) if saved.is_file() else {}
        if old.get("key") == key and key["adapter_checksum"]:
            extraction = old["result"]  # same adapter, same paragraph: the answer of the run that made it
        else:
            print(f"[prouie] pipeline: the {last} adapter on the extract demo paragraph")
            extraction = run_extract_demo(infos[last]["adapter"], cfg["extract_demo"])
            saved.write_text(json.dumps({"key": key, "result": extraction}, indent=2) + "\n")
    plots = make_plots(out, results, stages, infos)
    write_markdown(out, results, plots, infos, extraction)
    (out / "pipeline.json").write_text(json.dumps({"config": config, "stages": infos, "extract_demo": extraction}, indent=2) + "\n")
    print_summary(results, infos)
    if extraction is not None:
        print("\n".join(["", "The final adapter on new text:"] + [f"  {f['kind']:<24} {f['type']:<22} {f['text']!r} "
                                                                    f"[{f['start']}:{f['end']}] score {f['score'] if f['score'] is None else round(f['score'], 2)}"
                                                                    for f in extraction["found"]] or ["  nothing found"]))
    print(f"[prouie] pipeline report: {out / 'report.md'}")
    return infos
