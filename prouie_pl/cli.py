"""Command line: ``python -m prouie_pl <command> ...``.

Training commands (``fit``, ``validate``, ``test``, ``predict``) go through LightningCLI (see
:mod:`prouie_pl.lightning_cli`); the others are defined here with the same parser library (jsonargparse), so
every command takes ``--config FILE`` and ``--print_config`` and reports a bad option the same way.  Bad input of any command
(data, predictions, options) ends with a message naming what and where, and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from jsonargparse import ActionYesNo

from .formats import FORMATS
from .gemma_base import MissingModelPackage
from .reader import ON_ERROR, SPLITS, DataError, LoadReport

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

COMMANDS: dict[str, str] = {
    "fit": "train one stage (CM / SA supervised fine-tuning, DE GRPO) from a YAML config",
    "validate": "generation-based evaluation on the dev split with a config and a checkpoint",
    "test": "decode and score the test split; writes predictions.jsonl and report.json",
    "predict": "decode a split and write predictions.jsonl (and report.json when gold is present)",
    "pipeline": "run CM -> SA -> DE in one output folder, with reports and plots",
    "evaluate": "score a predictions file against the gold data (strict or InstructUIE-compatible)",
    "render": "write prompts and gold targets (full or concise format) of a split as JSON lines",
    "tiny-model": "build a tiny Llama and tokenizer offline (tests, demo, CPU benchmarks)",
    "demo-data": "write the embedded demo data set (seeded generator) to a folder",
    "export": "merge a LoRA adapter into a bf16 copy of its base model and save it",
    "extract": "extract entities, relations and events from your own text with a trained model and schema",
}


def _fail(lines: Sequence[str] | str, code: int = 2) -> int:
    for line in [lines] if isinstance(lines, str) else lines:
        print(f"error: {line}", file=sys.stderr)
    return code


def cmd_render(args) -> int:
    import random

    from .formats import example
    from .reader import load_records

    report = LoadReport()
    records = load_records(args.data_dir, args.split, args.tasks, args.datasets, args.max_records, args.on_error, report)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for rec in records:
            prompt, target = example(rec, args.format, args.shuffle_labels, rng)
            fh.write(json.dumps({"task": rec.task, "dataset": rec.dataset, "index": rec.index, "prompt": prompt, "output": target}, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records ({args.format} format) to {out}")
    if report.skipped:
        print(report.summary())
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_file, print_report

    ev = evaluate_file(args.data_dir, args.split, args.predictions, args.mode, args.tasks, args.datasets, args.max_records, args.on_error,
                       thresholds=args.thresholds)
    for line in ev.duplicates[:20] + ev.unknown[:20] + ev.missing[:20]:
        print(f"warning: {line}", file=sys.stderr)
    if ev.unknown or ev.missing or ev.duplicates:
        print(f"warning: {len(ev.unknown)} predictions for unknown records, {len(ev.missing)} records without a prediction, {len(ev.duplicates)} duplicate predictions", file=sys.stderr)
    print_report(ev.report, title=f"{Path(args.predictions).name} vs {args.split}")
    if ev.report.get("threshold_sweep"):
        from .evaluate import print_sweep

        print_sweep(ev.report["threshold_sweep"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(ev.report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


def cmd_tiny_model(args) -> int:
    from .tiny_model import build_tiny_model

    out = build_tiny_model(args.out, corpus=args.corpus, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                           num_layers=args.num_layers, pretrain_steps=args.pretrain_steps, seed=args.seed)
    print(f"saved a tiny model and tokenizer to {out} (load with AutoModelForCausalLM/AutoTokenizer.from_pretrained)")
    return 0


def cmd_demo_data(args) -> int:
    from .demo_data import generate

    from .demo_data import DEFAULT_SEED

    out = generate(args.out, seed=DEFAULT_SEED if args.seed is None else args.seed)
    print(f"wrote the demo data sets to {out}")
    return 0


def cmd_pipeline(args) -> int:
    from .pipeline import run_pipeline

    run_pipeline(pipeline_settings(args), args.out_dir, args.restart_from, args.set or {})
    return 0


def cmd_export(args) -> int:
    from .export import export_merged

    out = export_merged(args.adapter, args.base, args.out, args.dtype)
    print(f"saved the merged {args.dtype} model to {out} (AutoModelForCausalLM.from_pretrained loads it)")
    return 0


def cmd_extract(args) -> int:
    from .extract_command import run_extract

    return run_extract(args)


# ------------------------------------------------------------------------------------------ the parsers
#
# One mechanism for every command: jsonargparse, as LightningCLI uses for fit / validate / test / predict, so
# each command takes --config FILE (its options as YAML), --print_config, and reports bad options alike.


def _formatter():
    import argparse

    from jsonargparse import DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """jsonargparse's help, with descriptions and examples kept as written."""

    return HelpFormatter


def _parser(name: str, description: Optional[str] = None, epilog: Optional[str] = None):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(description=description or COMMANDS[name], epilog=epilog, formatter_class=_formatter())
    parser.add_argument("--config", action="config", help="a YAML file with this command's options")
    return parser


def _add_selection(p) -> None:
    p.add_argument("--data_dir", type=str, required=True, help="root of the IE INSTRUCTIONS layout (ROOT/{NER,RE,EE}/<Dataset>/)")
    p.add_argument("--split", type=str, default="test", choices=SPLITS)
    p.add_argument("--tasks", type=str, nargs="+", default=None, help="tasks to include (NER RE EE); default all")
    p.add_argument("--datasets", type=str, nargs="+", default=None, help="data sets by Name or TASK/Name; default all")
    p.add_argument("--max_records", type=Optional[int], default=None, help="cap on records per data set")
    p.add_argument("--on_error", type=str, default="error", choices=ON_ERROR, help="bad records: stop with exit code 2 (error) or drop and count them (skip)")


def add_pipeline_arguments(p) -> None:
    """The pipeline's options; a pipeline YAML (``--config``) holds the first eight."""
    from .pipeline import STAGES, ZERO_SHOT

    p.add_argument("--stages", type=dict[str, str], default={}, help=f"stage ({', '.join(STAGES)}) -> fit config, relative to the pipeline YAML or the working folder")
    p.add_argument("--overrides", type=dict[str, Any], default={}, help="dotted fit options applied to every stage")
    p.add_argument("--stage_overrides", type=dict[str, dict[str, Any]], default={}, help=f"dotted fit options per stage ({', '.join(STAGES)}, {ZERO_SHOT})")
    p.add_argument("--adapter", type=str, default="best", choices=("best", "last"), help="adapter a stage hands on: best by val/f1, or the last one")
    p.add_argument("--zero_shot", type=bool, default=False, help="score the base model before any training (prompts of the first stage)")
    p.add_argument("--test_dtype", type=str, default="same", choices=("same", "float32"), help="decode the test split with the frozen base as it is, or cast to float32")
    p.add_argument("--expected_seconds", type=dict[str, float], default={}, help="seconds each stage took on a reference machine (the progress line's estimate of the time left)")
    p.add_argument("--extract_demo", type=Optional[str], default=None, help="end with the final adapter run by extract on a paragraph: a YAML with text and schema, or demo (the shipped one)")
    p.add_argument("--out_dir", type=str, default="outputs/pipeline", help="output folder (one sub-folder per stage)")
    p.add_argument("--restart_from", type=Optional[str], default=None, choices=STAGES, help="delete this stage and the later ones, then run them again")
    p.add_argument("--set", type=Optional[dict[str, Any]], default=None, help='extra fit options for every stage, over the file\'s overrides, e.g. \'{"data.max_val_records": 8}\'')


def pipeline_settings(args) -> dict:
    """The pipeline YAML's settings from parsed pipeline options, checked, stage configs resolved to paths."""
    from .pipeline import check_pipeline_config

    files = args.get("config") or []
    where = str(files[-1]) if files else "the pipeline options"
    base = Path(str(files[-1])).parent if files else Path.cwd()
    cfg = {k: args.get(k) for k in ("stages", "overrides", "stage_overrides", "adapter", "zero_shot", "test_dtype", "extract_demo", "expected_seconds")}
    return check_pipeline_config(cfg, where, base)


def build_parser():
    from jsonargparse import ArgumentParser

    from .config_files import embedded_configs
    from .extract_command import DESCRIPTION, EPILOG, INPUT_FORMATS
    from .modeling import DTYPES

    lightning = "\n".join(f"  {name:<11} {COMMANDS[name]}" for name in LIGHTNING_COMMANDS)
    parser = ArgumentParser(
        prog="python -m prouie_pl",
        description="ProUIE-PL: progressive universal information extraction (CM -> SA -> DE) on Lightning.",
        epilog=f"training commands (LightningCLI; 'python -m prouie_pl fit --help'):\n{lightning}\n\n"
               "Every command takes --config FILE and --print_config; run 'python -m prouie_pl <command> --help' for its options.",
        formatter_class=_formatter(),
    )
    sub = parser.add_subcommands(required=False, dest="command")

    p = _parser("render")
    _add_selection(p)
    p.add_argument("--format", type=str, required=True, choices=FORMATS)
    p.add_argument("--out", type=str, required=True, help="output JSONL file")
    p.add_argument("--shuffle_labels", action=ActionYesNo, default=False, help="shuffle the label order of each prompt (as in training)")
    p.add_argument("--seed", type=int, default=0)
    sub.add_subcommand("render", p, help=COMMANDS["render"])

    p = _parser("evaluate")
    _add_selection(p)
    p.add_argument("--predictions", type=str, required=True, help="JSONL with task, dataset, index, output per line")
    p.add_argument("--mode", type=str, default="strict", choices=("strict", "instructuie"))
    p.add_argument("--out", type=Optional[str], default=None, help="write report.json here")
    p.add_argument("--thresholds", type=float, default=None, nargs="+", metavar="T",
                   help="also report P/R/F1 keeping only units scored above each threshold (0-1; needs unit_scores in the file)")
    sub.add_subcommand("evaluate", p, help=COMMANDS["evaluate"])

    p = _parser("pipeline", description=COMMANDS["pipeline"] + "; --config is the pipeline YAML (default: the tiny demo)",
                epilog="shipped pipeline configs: " + ", ".join(n for n in embedded_configs() if "pipeline" in n))
    add_pipeline_arguments(p)
    sub.add_subcommand("pipeline", p, help=COMMANDS["pipeline"])

    p = _parser("export", description=COMMANDS["export"] + " (never 4-bit: merging into quantised weights would round the adapter away)")
    p.add_argument("--adapter", type=str, required=True, help="adapter folder (PEFT format), e.g. outputs/demo/de/adapter")
    p.add_argument("--base", type=str, required=True, help="base model: hub id, local folder, or tiny")
    p.add_argument("--out", type=str, required=True, help="output folder for the merged model")
    p.add_argument("--dtype", type=str, default="bfloat16", choices=sorted(DTYPES), help="dtype of the merged weights")
    sub.add_subcommand("export", p, help=COMMANDS["export"])

    p = _parser("extract", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--model", type=str, required=True, help="a stage's adapter/ folder, a merged export folder, or an embedded model name (tiny, gemma-3-270m)")
    p.add_argument("--base", type=Optional[str], default=None, help="base model of an adapter (default: the one in its adapter_config.json)")
    p.add_argument("--schema", type=Optional[str], default=None, help="YAML or JSON: entities: [...], relations: [...], events: {type: [roles]}")
    p.add_argument("--labels_from", type=str, nargs="+", default=None, metavar="DATA_DIR/TASK/Dataset", help="use a data set's labels.json as (part of) the schema")
    p.add_argument("--input", type=str, required=True, help="a .txt file, a folder of .txt files, a .jsonl file (id, text), or - for standard input")
    p.add_argument("--input_format", type=str, default="auto", choices=INPUT_FORMATS, help="how to read --input (auto: by its suffix; standard input is text)")
    p.add_argument("--out", type=str, required=True, help="output JSONL file (one line per document)")
    p.add_argument("--resume", action=ActionYesNo, default=False, help="skip the documents whose ids are already in --out and append the others")
    p.add_argument("--overwrite", action=ActionYesNo, default=False, help="replace a non-empty --out")
    p.add_argument("--constrained", action=ActionYesNo, default=False, help="schema-constrained decoding: only schema keys and spans copied from the text")
    p.add_argument("--format", type=str, default=None, choices=FORMATS,
                   help="answer format the model writes (concise: SA and DE stages; full: CM; keyed: a model trained on it); "
                        "default: the one recorded in the model folder's answer_format.json, else concise")
    p.add_argument("--batch_size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--max_input_tokens", type=int, default=512, help="prompt tokens per window (instruction, schema and text)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="answer tokens per window")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quantization", type=str, default="none", choices=("none", "nf4"), help="load the base in 4-bit NF4 (bitsandbytes)")
    p.add_argument("--dtype", type=str, default="auto", choices=("auto", "float32", "bfloat16", "float16"), help="weights dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--progress", action=ActionYesNo, default=True, help="a progress bar (--no_progress: none)")
    p.add_argument("--scores", action=ActionYesNo, default=True, help="a score (0-1) for every unit: how sure the model was (--no_scores: none)")
    p.add_argument("--threshold", type=float, default=0.0, help="keep only units scored above this (0-1; 0 keeps all)")
    p.add_argument("--loop_guard", action=ActionYesNo, default=True,
                   help="end an answer that writes one block of tokens three times in a row, keeping two copies "
                        "(--no_loop_guard: decode to --max_new_tokens)")
    sub.add_subcommand("extract", p, help=COMMANDS["extract"])

    p = _parser("tiny-model")
    p.add_argument("--out", type=str, required=True)
    p.add_argument("--corpus", type=Optional[str], default=None, help="IE INSTRUCTIONS root whose training split trains the tokenizer and base (default: the demo data)")
    p.add_argument("--vocab_size", type=int, default=2000)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--pretrain_steps", type=int, default=600, help="language-model steps on the corpus's training texts before saving (0: random base)")
    p.add_argument("--seed", type=int, default=0)
    sub.add_subcommand("tiny-model", p, help=COMMANDS["tiny-model"])

    p = _parser("demo-data")
    p.add_argument("--out", type=str, required=True)
    p.add_argument("--seed", type=Optional[int], default=None)
    sub.add_subcommand("demo-data", p, help=COMMANDS["demo-data"])
    return parser


HANDLERS = {"render": cmd_render, "evaluate": cmd_evaluate, "pipeline": cmd_pipeline, "export": cmd_export,
            "extract": cmd_extract, "tiny-model": cmd_tiny_model, "demo-data": cmd_demo_data}


def _with_shipped_configs(argv: list[str]) -> list[str]:
    """``--config NAME`` of a shipped config becomes its path; ``pipeline`` without ``--config`` runs the tiny demo."""
    from .lightning_cli import embedded_config_args

    argv = embedded_config_args(argv)
    for i, a in enumerate(argv):
        path = argv[i + 1] if a in ("--config", "-c") and i + 1 < len(argv) else a.split("=", 1)[1] if a.startswith("--config=") else None
        if path is not None and not Path(path).is_file():
            from .config_files import embedded_configs

            kind = "pipeline config" if argv[0] == "pipeline" else "config"
            shipped = [n for n in embedded_configs() if ("pipeline" in n) == (argv[0] == "pipeline")]
            raise FileNotFoundError(f"--config {path}: the {kind} is neither a file nor a shipped config (shipped: {', '.join(shipped)})")
    if argv and argv[0] == "pipeline" and not any(a in ("--config", "-c") or a.startswith("--config=") for a in argv):
        if not any(a in ("-h", "--help") for a in argv):
            from .config_files import resolve_config

            argv = [argv[0], "--config", resolve_config("tiny/pipeline.yaml"), *argv[1:]]
    return argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .console import quiet_third_party

    quiet_third_party()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            from .lightning_cli import run_lightning_cli

            return run_lightning_cli(argv)
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 0
        cfg = parser.parse_args(_with_shipped_configs(argv))
        if not cfg.get("command"):
            parser.print_help()
            return 2
        return HANDLERS[cfg.command](cfg[cfg.command])
    except DataError as exc:
        return _fail(exc.lines + ([exc.hint] if exc.hint else []))
    except (ValueError, FileNotFoundError, MissingModelPackage) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", code=130)
