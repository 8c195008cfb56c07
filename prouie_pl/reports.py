"""What each stage bought and what it cost: ``report.md``, PNG plots and a rich summary table for a pipeline folder.

Takes the stages' test results (:class:`~prouie_pl.results.EvalResult`, keyed by stage) and the ``stage.json``
records of the pipeline (cost, blank answers, examples), and reads the CSV training logs
(``lightning_logs/version_*/metrics.csv``) for the curves.  Each plot has its own function, which takes what it
draws and the PNG path and returns the path, or ``None`` when there is nothing to draw.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

from .results import EvalResult
from .scoring import METRICS, overall_f1

STAGE_NAMES = {"zero_shot": "zero-shot", "cm": "CM", "sa": "CM+SA", "de": "CM+SA+DE"}
HEADLINE = ("NER", "RE_strict", "EE_trigger", "EE_argument")


def overall(result: EvalResult) -> float:
    return round(overall_f1(result.report), 2)


def cumulative_seconds(results: dict[str, EvalResult], infos: dict[str, dict]) -> list[float]:
    """Wall seconds up to the end of each stage (training + test decoding), in the stages' order."""
    out, total = [], 0.0
    for s in results:
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


def _dataset_f1(results: dict[str, EvalResult], metric: str) -> dict[str, list]:
    """Data set -> F1 per stage (``None`` where a stage has no score) for one metric, data sets sorted."""
    datasets = sorted({ds for r in results.values() for ds in r.tasks.get(metric, {}).get("datasets", {})})
    return {ds: [r.tasks.get(metric, {}).get("datasets", {}).get(ds, {}).get("f1") for r in results.values()] for ds in datasets}


def f1_table(results: dict[str, EvalResult]) -> tuple[list[str], list[list]]:
    """Rows: metric, data set, then F1 per stage; task averages last."""
    headers = ["metric", "data set"] + [STAGE_NAMES.get(s, s) for s in results]
    rows = []
    for metric in METRICS:
        rows += [[metric, ds] + f1s for ds, f1s in _dataset_f1(results, metric).items()]
    for metric in METRICS:
        if any(metric in r.tasks for r in results.values()):
            rows.append([metric, "average"] + [r.tasks.get(metric, {}).get("average_f1") for r in results.values()])
    rows.append(["overall", "mean of task scores"] + [overall(r) for r in results.values()])
    return headers, rows


def cost_table(results: dict[str, EvalResult], infos: dict[str, dict]) -> tuple[list[str], list[list]]:
    """One row per stage: what it cost (training), what decoding the test split took, the process's peak resident
    memory by the stage's end (the high-water mark so far, so a stage that needs less than an earlier one shows
    the earlier figure), and its answers (those the loop guard ended are counted apart from those that hit the
    token cap)."""
    headers = ["stage", "train s", "optimizer steps", "training tokens", "GRPO completions", "test decode s",
               "cumulative s", "peak RSS MB", "overall F1", "parse failures", "hit the token cap", "ended looping", "blank answers",
               "answers without structures"]
    rows = []
    for s, total in zip(results, cumulative_seconds(results, infos)):
        info = infos.get(s, {})
        cost = info.get("cost", {})
        rows.append([STAGE_NAMES.get(s, s), cost.get("seconds", 0.0), cost.get("steps", 0), cost.get("tokens", 0),
                     cost.get("completions", 0), info.get("test_seconds", 0.0), total,
                     info.get("peak_rss_mb") or "-", overall(results[s]),
                     results[s].parse_failures, results[s].truncated - results[s].looped, results[s].looped,
                     info.get("blank_answers", 0),
                     info.get("answers_without_structures", 0)])
    return headers, rows


def intervals(infos: dict[str, dict], n_boot: int = 1000) -> Optional[dict]:
    """Bootstrap intervals (:func:`prouie_pl.intervals.stage_intervals`) from the stages' per-sentence counts;
    None when a stage has none (a ``stage.json`` written before they were kept)."""
    from .intervals import counts_from_json, stage_intervals

    if not infos or not all("sentence_counts" in i for i in infos.values()):
        return None
    counts = {s: counts_from_json(i["sentence_counts"]) for s, i in infos.items()}
    try:
        return stage_intervals(counts, n_boot)
    except ValueError:  # stages scored on different sentences: no paired intervals
        return None


def interval_tables(results: dict[str, EvalResult], ci: dict) -> tuple[tuple[list, list], tuple[list, list]]:
    """(F1 with its 95% interval per stage and task average / overall) and (each stage against the one before:
    the paired difference and its interval)."""
    from .intervals import OVERALL

    metrics = [m for m in METRICS if any(m in r.tasks for r in results.values())]
    keys = [(("average", m), m) for m in metrics] + [(OVERALL, "overall")]

    def value(s, key):
        return overall(results[s]) if key == OVERALL else results[s].tasks.get(key[1], {}).get("average_f1")

    head1 = ["stage"] + [name for _, name in keys]
    rows1 = []
    for s in results:
        cells = [STAGE_NAMES.get(s, s)]
        for key, _ in keys:
            v, iv = value(s, key), ci["arms"].get(s, {}).get(key)
            cells.append("-" if v is None else f"{v:.1f} [{iv[0]:.1f}, {iv[1]:.1f}]" if iv else f"{v:.1f}")
        rows1.append(cells)
    head2 = ["comparison"] + [name for _, name in keys] + ["beyond its interval"]
    rows2 = []
    for (a, r), diff in ci["differences"].items():
        cells = [f"{STAGE_NAMES.get(a, a)} - {STAGE_NAMES.get(r, r)}"]
        for key, _ in keys:
            va, vr, iv = value(a, key), value(r, key), diff.get(key)
            cells.append("-" if va is None or vr is None or iv is None else f"{va - vr:+.1f} [{iv[0]:+.1f}, {iv[1]:+.1f}]")
        lo, hi = diff.get(OVERALL, (0.0, 0.0))
        cells.append("better" if lo > 0 else "worse" if hi < 0 else "no (overall)")
        rows2.append(cells)
    return (head1, rows1), (head2, rows2)


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


def write_markdown(out_dir: Path, results: dict[str, EvalResult], plots: list[str], infos: Optional[dict] = None,
                   extraction: Optional[dict] = None) -> Path:
    infos = infos or {}
    headers, rows = f1_table(results)
    lines = ["# ProUIE pipeline report", "", f"Test-split F1 (strict mode) before training and after each stage, in `{out_dir}`.", "",
             "| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([str(r[0]), str(r[1])] + [_fmt(v) for v in r[2:]]) + " |")
    headers, rows = cost_table(results, infos)
    lines += ["", "## What each stage cost", "",
              "Training tokens are the non-padding tokens of the SFT batches (prompt + answer); a GRPO stage samples "
              "completions instead. Cumulative seconds include the test decoding after each stage.", "",
              "| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in r) + " |" for r in rows]
    ci = intervals(infos)
    if ci is not None:
        (h1, r1), (h2, r2) = interval_tables(results, ci)
        lines += ["", "## How sure these figures are", "",
                  "95% bootstrap intervals over the test sentences (1,000 resamples of each data set's sentences, the "
                  "same draws for every stage, so the differences are paired). They show test-sentence noise only: "
                  "another training run would add its own spread.", "",
                  "| " + " | ".join(h1) + " |", "|" + "|".join(["---"] * len(h1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in r1]
        lines += ["", "| " + " | ".join(h2) + " |", "|" + "|".join(["---"] * len(h2)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in r2]
    examples = {s: infos.get(s, {}).get("examples", {}) for s in results}
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
    if extraction:
        lines += extraction_section(extraction)
    path = Path(out_dir) / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_f1_by_stage(results: dict[str, EvalResult], path: Path) -> Optional[str]:
    """Bars: test F1 per data set of the headline metrics, one bar per stage."""
    labels, values = [], {s: [] for s in results}
    for metric in HEADLINE:
        for ds, f1s in _dataset_f1(results, metric).items():
            labels.append(f"{metric}\n{ds}")
            for s, f1 in zip(results, f1s):
                values[s].append(f1 or 0.0)
    if not labels:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    width = 0.8 / max(1, len(results))
    for i, s in enumerate(results):
        ax.bar([x + i * width for x in range(len(labels))], values[s], width, label=STAGE_NAMES.get(s, s))
    ax.set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("test F1")
    ax.set_ylim(0, 100)
    ax.set_title("F1 per data set after each stage")
    ax.legend()
    return _save(fig, path)


def plot_training_loss(metrics: dict[str, list[dict]], path: Path) -> Optional[str]:
    """The ``train/loss`` curve of every stage (stage -> CSV log rows, in order), one panel each: the SFT stages'
    answer-token loss and the GRPO stage's policy loss are different quantities.  A stage of one logged point
    shows as a marker."""
    curves = {s: series(rows, "train/loss") for s, rows in metrics.items()}
    curves = {s: c for s, c in curves.items() if c[0]}
    if not curves:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves) + 1, 3.6), squeeze=False)
    for ax, (s, (xs, ys)) in zip(axes[0], curves.items()):
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None)
        ax.set_title(STAGE_NAMES.get(s, s) + (" (GRPO loss)" if s == "de" else " (answer-token loss)"), fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0][0].set_ylabel("training loss")
    return _save(fig, path)


def plot_grpo_reward(rows: list[dict], path: Path) -> Optional[str]:
    """Mean outcome reward (and mean completion F1 where logged) per GRPO step, from the DE stage's CSV log rows."""
    xs, ys = series(rows, "train/reward")
    if not xs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, ys, marker=".", label="mean outcome reward")
    xf, yf = series(rows, "train/f1")
    if xf:
        ax.plot(xf, yf, marker=".", label="mean completion F1")
    ax.set_xlabel("GRPO step")
    ax.set_title("Deep Exploration: rollout reward")
    ax.legend()
    return _save(fig, path)


def plot_f1_against_compute(results: dict[str, EvalResult], infos: dict, path: Path) -> Optional[str]:
    """Overall and per-task test F1 against cumulative wall seconds (training + test decoding), one point per stage."""
    xs = [t / 60.0 for t in cumulative_seconds(results, infos)]
    if len(xs) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [overall(r) for r in results.values()], marker="o", linewidth=2, label="overall")
    for task in sorted({t for r in results.values() for t in r.task_scores}):
        ax.plot(xs, [r.task_scores.get(task, 0.0) for r in results.values()], marker=".", linestyle="--", label=task)
    for x, (s, r) in zip(xs, results.items()):
        ax.annotate(STAGE_NAMES.get(s, s), (x, overall(r)), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xlabel("cumulative wall minutes (training + test decoding)")
    ax.set_ylabel("test F1")
    ax.set_ylim(0, 100)
    ax.set_title("F1 against compute")
    ax.legend(fontsize=8)
    return _save(fig, path)


def make_plots(out_dir: Path, results: dict[str, EvalResult], stages, infos: Optional[dict] = None) -> list[str]:
    """The pipeline's PNGs in ``out_dir`` (training curves from the stage folders' CSV logs); the paths made."""
    out_dir = Path(out_dir)
    made = [plot_f1_by_stage(results, out_dir / "f1_by_stage.png"),
            plot_training_loss({s: latest_metrics(out_dir / s) for s in stages}, out_dir / "training_loss.png")]
    if "de" in stages:
        made.append(plot_grpo_reward(latest_metrics(out_dir / "de"), out_dir / "grpo_reward.png"))
    if infos:
        made.append(plot_f1_against_compute(results, infos, out_dir / "f1_vs_compute.png"))
    return [p for p in made if p]


def print_summary(results: dict[str, EvalResult], infos: Optional[dict] = None, console=None) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 140)
    headers, rows = f1_table(results)
    table = Table(title="Test F1 by stage")
    for h in headers:
        table.add_column(h, justify="left" if h in ("metric", "data set") else "right", no_wrap=True)
    for r in rows:
        bold = r[1] in ("average", "mean of task scores")
        cells = [str(r[0]), str(r[1])] + [_fmt(v) for v in r[2:]]
        table.add_row(*[f"[bold]{c}[/bold]" if bold else c for c in cells])
    console.print(table)
    if infos:
        headers, rows = cost_table(results, infos)
        table = Table(title="What each stage cost")
        for h in headers:
            table.add_column(h, justify="left" if h == "stage" else "right")
        for r in rows:
            table.add_row(*[_cell(v) for v in r])
        console.print(table)
        ci = intervals(infos)
        if ci is not None:
            for title, (h, rs) in zip(("Test F1 with 95% bootstrap intervals", "Each stage against the one before (paired)"),
                                      interval_tables(results, ci)):
                table = Table(title=title)
                for col in h:
                    table.add_column(col, justify="left" if col in ("stage", "comparison") else "right")
                for r in rs:
                    table.add_row(*r)
                console.print(table)


def extraction_section(ex: dict) -> list[str]:
    """The report's last section: the final adapter run with ``extract`` on a paragraph outside the data."""
    lines = ["", "## The final adapter on new text", "",
             f"`{ex.get('command', 'python -m prouie_pl extract')}` on a paragraph that is in none of the data sets "
             f"({ex.get('seconds', 0):.1f} s):", "", "> " + ex.get("text", "").replace("\n", "\n> "), "",
             f"Schema: `{ex.get('schema')}`", "", "```json", ex.get("json", ""), "```"]
    found = ex.get("found") or []
    if found:
        lines += ["", "| kind | type | text | offsets | score |", "|---|---|---|---|---|"]
        lines += [f"| {f['kind']} | {f['type']} | {_md_escape(f['text'])} | {f['start']}-{f['end']} | "
                  f"{'-' if f.get('score') is None else format(f['score'], '.2f')} |" for f in found]
    else:
        lines += ["", "The adapter found nothing in it."]
    return lines
