"""The pipeline report from in-memory results: the F1 and cost tables, report.md, and one function per plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from prouie_pl.formats import render_target
from prouie_pl.reports import (cost_table, f1_table, make_plots, plot_f1_against_compute, plot_f1_by_stage, plot_grpo_reward,
                               plot_training_loss, write_markdown)
from prouie_pl.results import EvalResult

from test_results import ROWS

PNG = b"\x89PNG\r\n\x1a\n"


def _results() -> dict[str, EvalResult]:
    perfect = [(rec, render_target(rec, "concise"), False) for rec, _, _ in ROWS]
    looped = [(rec, out, cut, None, cut) for rec, out, cut in ROWS]  # the one cut answer was ended by the loop guard
    return {"zero_shot": EvalResult.score(looped, "strict", "test"), "cm": EvalResult.score(perfect, "strict", "test")}


def _infos() -> dict[str, dict]:
    return {"zero_shot": {"seconds": 30.0, "test_seconds": 5.0, "cost": {"seconds": 0.0, "steps": 0, "tokens": 0, "completions": 0},
                          "blank_answers": 2, "answers_without_structures": 3},
            "cm": {"seconds": 120.0, "test_seconds": 6.5, "cost": {"seconds": 110.0, "steps": 12, "tokens": 3456, "completions": 0},
                   "blank_answers": 0, "answers_without_structures": 1, "peak_rss_mb": 2345}}


def _write_log(stage_dir: Path, header: str, rows: list[str]) -> None:
    log = stage_dir / "lightning_logs" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text("\n".join([header, *rows]) + "\n")


def test_f1_and_cost_tables_come_from_the_results():
    results = _results()
    headers, rows = f1_table(results)
    assert headers == ["metric", "data set", "zero-shot", "CM"]
    table = {(r[0], r[1]): r[2:] for r in rows}
    assert table[("NER", "A")] == [pytest.approx(57.1429, abs=1e-4), 100.0]
    assert table[("RE_boundary", "R")] == [pytest.approx(66.6667, abs=1e-4), 100.0]
    assert table[("EE_argument", "average")] == [pytest.approx(66.6667, abs=1e-4), 100.0]
    assert rows[-1] == ["overall", "mean of task scores", 63.49, 100.0]
    assert len(rows) == 5 + 5 + 1  # one data set per metric, five averages, the overall row

    headers, rows = cost_table(results, _infos())
    assert headers[6:13] == ["cumulative s", "peak RSS MB", "overall F1", "parse failures", "hit the token cap", "ended looping",
                             "blank answers"]
    assert rows[0] == ["zero-shot", 0.0, 0, 0, 0, 5.0, 30.0, "-", 63.49, 5, 0, 1, 2, 3]  # a stage.json without the figure
    assert rows[1] == ["CM", 110.0, 12, 3456, 0, 6.5, 150.0, 2345, 100.0, 0, 0, 0, 0, 1]


def test_each_plot_draws_what_it_is_given_or_nothing(tmp_path):
    results, infos = _results(), _infos()
    assert plot_f1_by_stage({}, tmp_path / "a.png") is None
    assert plot_training_loss({"cm": [{"step": "0", "train/loss": ""}]}, tmp_path / "b.png") is None
    assert plot_grpo_reward([{"step": "1", "train/loss": "2.0"}], tmp_path / "c.png") is None
    assert plot_f1_against_compute({"cm": results["cm"]}, infos, tmp_path / "d.png") is None  # one point is no curve
    assert not list(tmp_path.iterdir())

    made = [plot_f1_by_stage(results, tmp_path / "a.png"),
            plot_training_loss({"cm": [{"step": "0", "train/loss": "3.0"}, {"step": "1", "train/loss": "2.5"}],
                                "sa": [{"step": "0", "train/loss": "2.0"}]}, tmp_path / "b.png"),
            plot_grpo_reward([{"step": "1", "train/reward": "0.2", "train/f1": "0.3"}, {"step": "2", "train/reward": "0.4", "train/f1": ""}],
                             tmp_path / "c.png"),
            plot_f1_against_compute(results, infos, tmp_path / "d.png")]
    assert made == [str(tmp_path / f"{c}.png") for c in "abcd"]
    for p in made:
        assert Path(p).read_bytes()[:8] == PNG and Path(p).stat().st_size > 5000


def test_make_plots_and_report_md_for_a_pipeline_folder(tmp_path):
    results, infos = _results(), _infos()
    _write_log(tmp_path / "cm", "epoch,step,train/loss", ["0,0,3.0", "0,1,2.5", "0,2,2.25"])
    plots = make_plots(tmp_path, results, ["cm"], infos)
    assert plots == [str(tmp_path / n) for n in ("f1_by_stage.png", "training_loss.png", "f1_vs_compute.png")]
    _write_log(tmp_path / "de", "epoch,step,train/reward,train/f1", ["0,1,0.5,0.25"])
    with_de = make_plots(tmp_path, {**results, "de": results["cm"]}, ["cm", "de"], {**infos, "de": infos["cm"]})
    assert [Path(p).name for p in with_de] == ["f1_by_stage.png", "training_loss.png", "grpo_reward.png", "f1_vs_compute.png"]
    assert make_plots(tmp_path, results, ["cm"]) == plots[:2]  # without stage records: no F1 against compute

    md = write_markdown(tmp_path, results, plots, infos).read_text(encoding="utf-8")
    lines = md.splitlines()
    assert "| NER | A | 57.14 | 100.00 |" in lines
    assert "| overall | mean of task scores | 63.49 | 100.00 |" in lines
    assert "| zero-shot | 0.0 | 0 | 0 | 0 | 5.0 | 30.0 | - | 63.5 | 5 | 0 | 1 | 2 | 3 |" in lines
    assert "| CM | 110.0 | 12 | 3,456 | 0 | 6.5 | 150.0 | 2,345 | 100.0 | 0 | 0 | 0 | 0 | 1 |" in lines
    assert lines[-3:] == ["![f1_by_stage](f1_by_stage.png)", "![training_loss](training_loss.png)", "![f1_vs_compute](f1_vs_compute.png)"]


def test_bootstrap_intervals_hold_the_estimate_and_pair_the_stages():
    from prouie_pl.intervals import OVERALL, per_sentence_counts, stage_intervals

    recs = [rec for rec, _, _ in ROWS]
    zero = per_sentence_counts(recs, [out for _, out, _ in ROWS])
    perfect = per_sentence_counts(recs, [render_target(r, "concise") for r in recs])
    results = _results()
    ci = stage_intervals({"zero_shot": zero, "cm": perfect, "again": perfect}, n_boot=300)
    lo, hi = ci["arms"]["zero_shot"][OVERALL]
    assert lo <= results["zero_shot"].overall_f1 <= hi and hi - lo > 1.0  # imperfect answers: a real spread
    assert ci["arms"]["cm"][OVERALL] == (100.0, 100.0)
    d_lo, d_hi = ci["differences"][("cm", "zero_shot")][OVERALL]
    assert d_lo > 0 and d_hi <= 100.0 - lo + 1e-9  # perfect beats the flawed answers on every resample
    assert ci["differences"][("again", "cm")][OVERALL] == (0.0, 0.0)  # paired: the same draws for every arm
