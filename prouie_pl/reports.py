"""What each stage bought and what it cost: ``report.md``, PNG plots and a rich summary table for a pipeline folder.

Takes the stages' test reports and the ``stage.json`` records the pipeline wrote (cost, blank answers,
examples), and reads the CSV training logs (``lightning_logs/version_*/metrics.csv``) for the curves.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

from .scoring import METRICS, overall_f1, task_scores

STAGE_NAMES = {"zero_shot": "zero-shot", "cm": "CM", "sa": "CM+SA", "de": "CM+SA+DE"}
HEADLINE = ("NER", "RE_strict", "EE_trigger", "EE_argument")


def parse_failures(report: dict) -> int:
    """Unparsable answers in a report; a data set appears under several metrics of its task, count it once."""
    return sum(v["parse_failures"] for m, t in report["tasks"].items() if m in ("NER", "RE_strict", "EE_trigger") for v in t["datasets"].values())


def overall(report: dict) -> float:
    return round(overall_f1(report), 2)


def cumulative_seconds(reports: dict[str, dict], infos: dict[str, dict]) -> list[float]:
    """Wall seconds up to the end of each stage (training + test decoding), in the stages' order."""
    out, total = [], 0.0
    for s in reports:
        total += float(infos.get(s, {}).get("seconds", 0.0))
        out.append(round(total, 1))
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
    rows.append(["overall", "mean of task scores"] + [overall(reports[s]) for s in stages])
    return headers, rows


def cost_table(reports: dict[str, dict], infos: dict[str, dict]) -> tuple[list[str], list[list]]:
    """One row per stage: what it cost (training), what decoding the test split took, and its answers."""
    headers = ["stage", "train s", "optimizer steps", "training tokens", "GRPO completions", "test decode s",
               "cumulative s", "overall F1", "parse failures", "blank answers", "answers without structures"]
    rows = []
    for s, total in zip(reports, cumulative_seconds(reports, infos)):
        info = infos.get(s, {})
        cost = info.get("cost", {})
        rows.append([STAGE_NAMES.get(s, s), cost.get("seconds", 0.0), cost.get("steps", 0), cost.get("tokens", 0),
                     cost.get("completions", 0), info.get("test_seconds", 0.0), total, overall(reports[s]),
                     parse_failures(reports[s]), info.get("blank_answers", 0), info.get("answers_without_structures", 0)])
    return headers, rows


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def write_markdown(out_dir: Path, reports: dict[str, dict], plots: list[str], infos: Optional[dict] = None) -> Path:
    infos = infos or {}
    headers, rows = f1_table(reports)
    lines = ["# ProUIE pipeline report", "", f"Test-split F1 (strict mode) before training and after each stage, in `{out_dir}`.", "",
             "| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([str(r[0]), str(r[1])] + [_fmt(v) for v in r[2:]]) + " |")
    headers, rows = cost_table(reports, infos)
    lines += ["", "## What each stage cost", "",
              "Training tokens are the non-padding tokens of the SFT batches (prompt + answer); a GRPO stage samples "
              "completions instead. Cumulative seconds include the test decoding after each stage.", "",
              "| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in r) + " |" for r in rows]
    examples = {s: infos.get(s, {}).get("examples", {}) for s in reports}
    tasks = sorted({t for ex in examples.values() for t in ex})
    if tasks:
        lines += ["", "## Example predictions", ""]
    for task in tasks:
        first = next(ex[task] for ex in examples.values() if task in ex)
        for k, item in enumerate(first):
            lines += [f"**{task} / {item['dataset']} #{item['index']}**: {item['sentence']}", "",
                      "| | answer |", "|---|---|", f"| gold | `{_md_escape(item['gold'])}` |"]
            for s, ex in examples.items():
                if task in ex and k < len(ex[task]):
                    lines.append(f"| {STAGE_NAMES.get(s, s)} | `{_md_escape(ex[task][k]['prediction']) or '(blank)'}` |")
            lines.append("")
    lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    path = Path(out_dir) / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_plots(out_dir: Path, reports: dict[str, dict], stages, infos: Optional[dict] = None) -> list[str]:
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
    if infos:
        made += plot_f1_against_compute(out_dir, reports, infos)
    return made


def plot_f1_against_compute(out_dir: Path, reports: dict[str, dict], infos: dict) -> list[str]:
    """Overall and per-task test F1 against cumulative wall seconds (training + test decoding), one point per stage."""
    import matplotlib.pyplot as plt

    xs = [t / 60.0 for t in cumulative_seconds(reports, infos)]
    if len(xs) < 2:
        return []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [overall(reports[s]) for s in reports], marker="o", linewidth=2, label="overall")
    for task in sorted({t for r in reports.values() for t in task_scores(r)}):
        ax.plot(xs, [task_scores(reports[s]).get(task, 0.0) for s in reports], marker=".", linestyle="--", label=task)
    for x, s in zip(xs, reports):
        ax.annotate(STAGE_NAMES.get(s, s), (x, overall(reports[s])), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xlabel("cumulative wall minutes (training + test decoding)")
    ax.set_ylabel("test F1")
    ax.set_ylim(0, 100)
    ax.set_title("F1 against compute")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "f1_vs_compute.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def print_summary(reports: dict[str, dict], infos: Optional[dict] = None, console=None) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 140)
    headers, rows = f1_table(reports)
    table = Table(title="Test F1 by stage")
    for h in headers:
        table.add_column(h, justify="left" if h in ("metric", "data set") else "right", no_wrap=True)
    for r in rows:
        bold = r[1] in ("average", "mean of task scores")
        cells = [str(r[0]), str(r[1])] + [_fmt(v) for v in r[2:]]
        table.add_row(*[f"[bold]{c}[/bold]" if bold else c for c in cells])
    console.print(table)
    if infos:
        headers, rows = cost_table(reports, infos)
        table = Table(title="What each stage cost")
        for h in headers:
            table.add_column(h, justify="left" if h == "stage" else "right")
        for r in rows:
            table.add_row(*[_cell(v) for v in r])
        console.print(table)
