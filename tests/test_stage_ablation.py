"""bench/stage_ablation.py: the budget split, the step plan, the paired bootstrap, the notes-keeping results
file, and one real CM fit on the demo data that must enter the curriculum's last phase where the plan says."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import _bootstrap  # noqa: E402
import _common  # noqa: E402
import stage_ablation as sa  # noqa: E402
from training_helpers import single_thread  # noqa: E402



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on a small shared machine a second one mostly waits (and the fit test is about steps, not speed)."""
    with single_thread():
        yield


CAL = {"full": {"s_per_token": 1e-3}, "concise": {"s_per_token": 5e-4},
       "tokens": {"NER": {"n": 10, "full": 100.0, "concise": 60.0}, "RE": {"n": 10, "full": 200.0, "concise": 80.0},
                  "EE": {"n": 10, "full": 300.0, "concise": 100.0}}}


@pytest.mark.parametrize("budget,cm,de", [(600, 0.6, 0.2), (10, 0.6, 0.2), (97, 0.5, 0.3)])
def test_every_arm_trains_for_the_budget_and_de_shares_the_cm_stage_of_cm_sa(budget, cm, de):
    plan = sa.arm_stages(budget, cm, de)
    assert list(plan) == list(sa.ARMS)
    for arm, stages in plan.items():
        assert sum(s.seconds for s in stages) == budget, arm
        assert [s.after for s in stages[1:]] == [s.name for s in stages[:-1]], arm  # each stage starts from the last
    assert plan["CM+SA+DE"][0] is plan["CM+SA"][0]
    assert [s.kind for s in plan["CM+SA+DE"]] == ["cm", "sa", "de"] and plan["CM"][0].name != plan["CM+SA"][0].name
    assert plan["CM+SA+DE"][2].seconds == round(de * budget)
    with pytest.raises(SystemExit, match="leave a stage without time"):
        sa.arm_stages(budget, 0.7, 0.3)


def test_cm_tokens_weigh_phase_i_by_i_and_the_others_mix_every_task():
    assert sa.stage_tokens("cm", CAL["tokens"]) == pytest.approx((1 * 100 + 2 * 150 + 3 * 200) / 6)
    assert sa.stage_tokens("sa", CAL["tokens"]) == pytest.approx(80.0)
    assert sa.stage_tokens("mixed", CAL["tokens"]) == pytest.approx(80.0)


@pytest.mark.parametrize("seconds", [1, 20, 360, 600, 5000])
def test_the_plan_fills_the_share_and_starts_ee_by_half_way(seconds):
    steps, unit = sa.plan_steps(sa.Stage("x", "cm", seconds), CAL, batch=8)
    assert unit >= 1 and steps >= 4 * unit  # NER 1 unit, NER+RE 2 units, then at least one EE unit
    if steps >= 12:
        assert 3 * unit <= steps / 2
        assert steps == int(seconds / (1e-3 * 8 * sa.stage_tokens("cm", CAL["tokens"])))
    sft, none = sa.plan_steps(sa.Stage("y", "mixed", seconds), CAL, batch=8)
    assert none is None and sft == max(1, int(seconds / (5e-4 * 8 * 80.0)))
    assert sa.plan_steps(sa.Stage("z", "de", seconds), CAL, batch=4) == (None, None)


def counts_for(tp_per_sentence, gold=2, n=40):
    return [(t, 0, gold - t) for t in (tp_per_sentence if isinstance(tp_per_sentence, list) else [tp_per_sentence] * n)]


def test_paired_bootstrap_is_zero_for_equal_arms_and_positive_for_a_better_one():
    rng = np.random.default_rng(3)
    base = {("A", "NER"): counts_for(list(rng.integers(0, 3, 40))), ("B", "RE_strict"): counts_for(list(rng.integers(0, 3, 40)))}
    better = {k: [(min(tp + 1, 2), 0, 2 - min(tp + 1, 2)) for tp, _, _ in v] for k, v in base.items()}
    diffs = sa.paired_differences({"mixed": [base], "same": [base], "better": [better]}, "mixed", n_boot=200)
    assert set(diffs) == {"same", "better"} and set(diffs["same"]) == {("A", "NER"), ("B", "RE_strict"), ("overall", "")}
    assert all(v == (0.0, 0.0) for v in diffs["same"].values())
    assert all(lo > 0 for lo, _ in diffs["better"].values())
    assert diffs == sa.paired_differences({"mixed": [base], "same": [base], "better": [better]}, "mixed", n_boot=200)


def test_resampled_f1_is_the_scorers_f1_and_averages_runs():
    from prouie_pl.demo_data import demo_data_dir
    from prouie_pl.formats import render_target
    from prouie_pl.reader import load_records
    from prouie_pl.scoring import Scorer

    recs = load_records(demo_data_dir(), "test", datasets=["NER/DemoNER"])[:12]
    outputs = [render_target(r, "concise", r.schema) if i % 3 else "{}" for i, r in enumerate(recs)]
    counts = _bootstrap.per_sentence_counts(recs, outputs)[("DemoNER", "NER")]
    scorer = Scorer("strict")
    for r, o in zip(recs, outputs):
        scorer.add(r, o)
    identity = np.arange(len(recs))[None]
    assert _bootstrap.resampled_f1(counts, identity)[0] == pytest.approx(scorer.counts["NER"]["DemoNER"].f1)
    perfect = _bootstrap.per_sentence_counts(recs, [render_target(r, "concise", r.schema) for r in recs])[("DemoNER", "NER")]
    both = _bootstrap.resampled_f1([counts, perfect], identity)[0]
    assert both == pytest.approx((scorer.counts["NER"]["DemoNER"].f1 + 100.0) / 2)


def test_results_file_keeps_the_notes_a_person_wrote(tmp_path):
    out = tmp_path / "r.md"
    _common.write_result("r.md", "T", "| table 1 |", str(out), keep_notes=True)
    assert out.read_text().rstrip().endswith("## Notes\n\n(written by hand after the run)")
    out.write_text(out.read_text().replace("(written by hand after the run)", "CM+SA wins on RE.\n\n### Detail\n\nmore"))
    _common.write_result("r.md", "T", "| table 2 |", str(out), keep_notes=True)
    text = out.read_text()
    assert "| table 2 |" in text and "| table 1 |" not in text
    assert text.rstrip().endswith("## Notes\n\nCM+SA wins on RE.\n\n### Detail\n\nmore") and text.count("## Notes") == 1


def test_a_cm_stage_enters_ee_where_the_plan_says_and_decodes_its_test_sentences(tmp_path):
    from prouie_pl.demo_data import demo_data_dir
    from prouie_pl.reader import load_records
    from prouie_pl.reports import latest_metrics

    datasets = ["NER/DemoNER", "RE/DemoRE", "EE/DemoEE"]
    args = Namespace(model="tiny", datasets=datasets, train=16, test=3, sa_per_dataset=4, data_dir=tmp_path / "data",
                     n_tasks=3, max_new_tokens_full=8, max_new_tokens_concise=8)
    sa.write_subset(demo_data_dir(), args.data_dir, datasets, args.train, args.test, seed=0)
    assert [len(load_records(args.data_dir, split, datasets=datasets)) for split in ("train", "test")] == [48, 9]
    info = sa.train_stage(sa.Stage("CM/cm", "cm", 600), args, tmp_path, seed=1, steps=7, unit=1, test=2)
    assert info["cost"]["steps"] == 7 and info["cost"]["tokens"] > 0 and info["cost"]["completions"] == 0
    # one phase per epoch of `unit` steps: NER 1, NER+RE 2, then NER+RE+EE from the step the plan names
    phases = [int(float(r["train/phase"])) for r in latest_metrics(tmp_path / "CM" / "cm") if r.get("train/phase")]
    assert phases == [0, 1, 1, 2, 2, 2, 2] and sa.last_phase_start(1, 3) == 1 + phases.index(2)
    records, outputs = _bootstrap.read_predictions(tmp_path / "CM" / "cm", load_records(args.data_dir, "test", datasets=datasets))
    assert sorted(r.dataset for r in records) == ["DemoEE"] * 2 + ["DemoNER"] * 2 + ["DemoRE"] * 2 and len(outputs) == 6
    assert (tmp_path / "CM" / "cm" / "adapter" / "adapter_config.json").is_file()
    assert sa.train_stage(sa.Stage("CM/cm", "cm", 600), args, tmp_path, seed=1, steps=7, unit=1, test=2) == info  # reused
