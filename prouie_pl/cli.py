"""Command line: ``python -m prouie_pl <command> ...``.

Training commands (``fit``, ``validate``, ``test``, ``predict``) go through LightningCLI (see
:mod:`prouie_pl.lightning_cli`); the others are plain commands defined here.  Bad input of any command
(data, predictions, options) ends with a message naming what and where, and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

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


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_dir", required=True, help="root of the IE INSTRUCTIONS layout (ROOT/{NER,RE,EE}/<Dataset>/)")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--tasks", nargs="+", default=None, help="tasks to include (NER RE EE); default all")
    p.add_argument("--datasets", nargs="+", default=None, help="data sets by Name or TASK/Name; default all")
    p.add_argument("--max_records", type=int, default=None, help="cap on records per data set")
    p.add_argument("--on_error", default="error", choices=ON_ERROR, help="bad records: stop with exit code 2 (error) or drop and count them (skip)")


def cmd_render(args: argparse.Namespace) -> int:
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_file, print_report

    ev = evaluate_file(args.data_dir, args.split, args.predictions, args.mode, args.tasks, args.datasets, args.max_records, args.on_error)
    for line in ev.duplicates[:20] + ev.unknown[:20] + ev.missing[:20]:
        print(f"warning: {line}", file=sys.stderr)
    if ev.unknown or ev.missing or ev.duplicates:
        print(f"warning: {len(ev.unknown)} predictions for unknown records, {len(ev.missing)} records without a prediction, {len(ev.duplicates)} duplicate predictions", file=sys.stderr)
    print_report(ev.report, title=f"{Path(args.predictions).name} vs {args.split}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(ev.report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from .tiny_model import build_tiny_model

    out = build_tiny_model(args.out, corpus=args.corpus, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                           num_layers=args.num_layers, pretrain_steps=args.pretrain_steps, seed=args.seed)
    print(f"saved a tiny model and tokenizer to {out} (load with AutoModelForCausalLM/AutoTokenizer.from_pretrained)")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from .demo_data import generate

    from .demo_data import DEFAULT_SEED

    out = generate(args.out, seed=DEFAULT_SEED if args.seed is None else args.seed)
    print(f"wrote the demo data sets to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    epilog = "commands:\n" + "\n".join(f"  {name:<11} {desc}" for name, desc in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="python -m prouie_pl",
        description="ProUIE-PL: progressive universal information extraction (CM -> SA -> DE) on Lightning.",
        epilog=epilog + "\n\nRun 'python -m prouie_pl <command> --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="command (see the list below)")

    p = sub.add_parser("render", description=COMMANDS["render"])
    _add_selection(p)
    p.add_argument("--format", required=True, choices=("full", "concise"))
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--shuffle_labels", action="store_true", help="shuffle the label order of each prompt (as in training)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("evaluate", description=COMMANDS["evaluate"])
    _add_selection(p)
    p.add_argument("--predictions", required=True, help="JSONL with task, dataset, index, output per line")
    p.add_argument("--mode", default="strict", choices=("strict", "instructuie"))
    p.add_argument("--out", default=None, help="write report.json here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("tiny-model", description=COMMANDS["tiny-model"])
    p.add_argument("--out", required=True)
    p.add_argument("--corpus", default=None, help="IE INSTRUCTIONS root whose training split trains the tokenizer and base (default: the demo data)")
    p.add_argument("--vocab_size", type=int, default=2000)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--pretrain_steps", type=int, default=600, help="language-model steps on the corpus's training texts before saving (0: random base)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("demo-data", description=COMMANDS["demo-data"])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_demo_data)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            from .lightning_cli import run_lightning_cli

            return run_lightning_cli(argv)
        if argv and argv[0] == "pipeline":
            from .pipeline import pipeline_main

            return pipeline_main(argv[1:])
        if argv and argv[0] == "export":
            from .export import export_main

            return export_main(argv[1:])
        if argv and argv[0] == "extract":
            from .extract_command import extract_main

            return extract_main(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0 if not argv else 2
        return args.func(args)
    except DataError as exc:
        return _fail(exc.lines + ([exc.hint] if exc.hint else []))
    except (ValueError, FileNotFoundError, MissingModelPackage) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", code=130)
