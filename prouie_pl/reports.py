"""What each stage bought: ``report.md``, PNG plots and a rich summary table for a pipeline folder.

Reads what the stages left in ``DIR/<stage>/``: the test ``report.json`` and the CSV training log
(``lightning_logs/version_*/metrics.csv``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

from .scoring import METRICS, task_scores

STAGE_NAMES = {"cm": "CM", "sa": "CM+SA", "de": "CM+SA+DE"}
HEADLINE = ("NER", "RE_strict", "EE_trigger", "EE_argument")


def load_reports(out_dir: Path, stages) -> dict[str, dict]:
    out = {}
    for s in stages:
        p = Path(out_dir) / s / "report.json"
        if p.is_file():
            out[s] = json.loads(p.read_text())
    return out


def latest_metrics(stage_dir: Path) -> list[dict]:
    """Rows of the newest CSV log of a stage (all versions concatenated, in order, for resumed runs)."""
    rows: list[dict] = []
    logs = sorted((Path(stage_dir) / "lightning_logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    for p in logs:
        with p.open() as fh:
            rows.extend(csv.DictReader(fh))
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if v not in (None, ""):
            xs.append(int(float(r.get("step") or 0)))
            ys.append(float(v))
    return xs, ys


def f1_table(reports: dict[str, dict]) -> tuple[list[str], list[list]]:
    """Rows: metric, data set, then F1 per stage; task averages last."""
    stages = list(reports)
    headers = ["metric", "data set"] + [STAGE_NAMES.get(s, s) for s in stages]
    rows = []
    for metric in METRICS:
        datasets = sorted({ds for r in reports.values() for ds in r["tasks"].get(metric, {}).get("datasets", {})})
        for ds in datasets:
            rows.append([metric, ds] + [reports[s]["tasks"].get(metric, {}).get("datasets", {}).get(ds, {}).get("f1") for s in stages])
    for metric in METRICS:
        if any(metric in r["tasks"] for r in reports.values()):
            rows.append([metric, "average"] + [reports[s]["tasks"].get(metric, {}).get("average_f1") for s in stages])
    rows.append(["overall", "mean of task scores"] + [round(sum(task_scores(reports[s]).values()) / max(1, len(task_scores(reports[s]))), 2) for s in stages])
    return headers, rows


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def write_markdown(out_dir: Path, reports: dict[str, dict], plots: list[str], timings: Optional[dict] = None) -> Path:
    headers, rows = f1_table(reports)
    lines = ["# ProUIE pipeline report", "", f"Test-split F1 (strict mode) after each stage, in `{out_dir}`.", "",
             "| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([str(r[0]), str(r[1])] + [_fmt(v) for v in r[2:]]) + " |")
    fails = {STAGE_NAMES.get(s, s): sum(v["parse_failures"] for m, t in rep["tasks"].items() if m in ("NER", "RE_strict", "EE_trigger") for v in t["datasets"].values())
             for s, rep in reports.items()}
    lines += ["", "Parse failures on the test split: " + ", ".join(f"{k} {v}" for k, v in fails.items()) + "."]
    if timings:
        lines += ["", "Stage wall time: " + ", ".join(f"{STAGE_NAMES.get(k, k)} {v:.0f} s" for k, v in timings.items()) + "."]
    lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    path = Path(out_dir) / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_plots(out_dir: Path, reports: dict[str, dict], stages) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    made = []
    # F1 per data set by stage
    labels, values = [], {s: [] for s in reports}
    for metric in HEADLINE:
        datasets = sorted({ds for r in reports.values() for ds in r["tasks"].get(metric, {}).get("datasets", {})})
        for ds in datasets:
            labels.append(f"{metric}\n{ds}")
            for s in reports:
                values[s].append(reports[s]["tasks"].get(metric, {}).get("datasets", {}).get(ds, {}).get("f1") or 0.0)
    if labels:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
        width = 0.8 / max(1, len(reports))
        for i, s in enumerate(reports):
            ax.bar([x + i * width for x in range(len(labels))], values[s], width, label=STAGE_NAMES.get(s, s))
        ax.set_xticks([x + width * (len(reports) - 1) / 2 for x in range(len(labels))])
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("test F1")
        ax.set_ylim(0, 100)
        ax.set_title("F1 per data set after each stage")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "f1_by_stage.png", dpi=110)
        plt.close(fig)
        made.append(str(out_dir / "f1_by_stage.png"))
    # training loss per stage
    fig, ax = plt.subplots(figsize=(7, 4))
    any_loss = False
    offset = 0
    for s in stages:
        xs, ys = series(latest_metrics(out_dir / s), "train/loss") if s != "de" else ([], [])
        if xs:
            ax.plot([x + offset for x in xs], ys, label=STAGE_NAMES.get(s, s))
            offset += max(xs) + 1
            any_loss = True
    if any_loss:
        ax.set_xlabel("optimizer step (stages back to back)")
        ax.set_ylabel("answer-token loss")
        ax.set_title("Supervised training loss per stage")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "training_loss.png", dpi=110)
        made.append(str(out_dir / "training_loss.png"))
    plt.close(fig)
    # GRPO reward curve
    if "de" in stages:
        xs, ys = series(latest_metrics(out_dir / "de"), "train/reward")
        if xs:
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.plot(xs, ys, marker=".", label="mean outcome reward")
            xf, yf = series(latest_metrics(out_dir / "de"), "train/f1")
            if xf:
                ax.plot(xf, yf, marker=".", label="mean completion F1")
            ax.set_xlabel("GRPO step")
            ax.set_title("Deep Exploration: rollout reward")
            ax.legend()
            fig.tight_layout()
            fig.savefig(out_dir / "grpo_reward.png", dpi=110)
            plt.close(fig)
            made.append(str(out_dir / "grpo_reward.png"))
    return made


def print_summary(reports: dict[str, dict], console=None) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 120)
    headers, rows = f1_table(reports)
    table = Table(title="Test F1 by stage")
    for h in headers:
        table.add_column(h, justify="left" if h in ("metric", "data set") else "right", no_wrap=True)
    for r in rows:
        bold = r[1] in ("average", "mean of task scores")
        cells = [str(r[0]), str(r[1])] + [_fmt(v) for v in r[2:]]
        table.add_row(*[f"[bold]{c}[/bold]" if bold else c for c in cells])
    console.print(table)
