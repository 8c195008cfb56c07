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


def args_for(tmp_path, **extra):
    base = dict(model="tiny", datasets=["NER/DemoNER", "RE/DemoRE", "EE/DemoEE"], train=16, dev=2, test=3, sa_per_dataset=4,
                data_dir=tmp_path / "data", root=tmp_path / "seed1", n_tasks=3, cm_unit=1, sa_epochs=1, de_steps=2,
                max_new_tokens_full=8, max_new_tokens_concise=8, concise_format="concise")
    return Namespace(**{**base, **extra})


def test_the_chain_starts_each_stage_from_the_last_and_mixed_runs_for_the_chains_seconds(tmp_path):
    stages = {s.name: s for s in sa.STAGES}
    assert [s.arm for s in sa.STAGES] == list(sa.ARMS)
    assert (stages["sa"].after, stages["de"].after, stages["cm"].after, stages["mixed"].after) == ("cm", "sa", None, None)
    args = args_for(tmp_path, cm_unit=25)
    cm = sa.stage_options(stages["cm"], args, seed=3)
    assert cm["trainer.limit_train_batches"] == 25 and cm["data.epochs_per_phase"] == [1, 2, 3] and cm["trainer.max_epochs"] == 6
    assert cm["data.schedule"] == "cumulative" and cm["trainer.check_val_every_n_epoch"] == 2 and cm["data.max_val_records"] == 2
    assert cm["trainer.max_time"] is None and cm["model.init_args.generation.max_new_tokens"] == 8
    assert sa.stage_options(stages["sa"], args, seed=3)["trainer.max_epochs"] == 1
    assert sa.stage_options(stages["de"], args, seed=3)["trainer.max_steps"] == 2
    mixed = sa.stage_options(stages["mixed"], args, seed=3, mixed_seconds=3725.4)
    assert mixed["trainer.max_time"] == "00:01:02:05" and mixed["trainer.max_steps"] == 100_000
    assert mixed["data.schedule"] == "mixed" and mixed["data.target_format"] == "concise"
    keyed = args_for(tmp_path, concise_format="keyed")  # --concise-format reaches every stage that writes concise answers
    assert [sa.stage_options(stages[k], keyed, seed=3, mixed_seconds=60.0).get("data.target_format") for k in ("sa", "de", "mixed")] \
        == ["keyed"] * 3 and "data.target_format" not in sa.stage_options(stages["cm"], keyed, seed=3)
    # a unit counts optimizer steps: a config that accumulates two micro-batches a step trains twice the batches
    assert sa.accumulation("tiny", "cm") == 1 and sa.accumulation("gemma-3-270m", "cm") == 2
    assert sa.stage_options(stages["cm"], args_for(tmp_path, cm_unit=25, model="gemma-3-270m"), seed=3)["trainer.limit_train_batches"] == 50
    assert sa.trained_seconds({"cost": {"seconds": 100.0, "validation_seconds": 30.5}}) == pytest.approx(69.5)
    assert sa.trained_seconds({"cost": {"seconds": 100.0}}) == 100.0  # stages saved before validation was timed


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


def test_a_cm_stage_enters_ee_on_schedule_checks_dev_and_decodes_its_test_sentences(tmp_path):
    from prouie_pl.demo_data import demo_data_dir
    from prouie_pl.reader import load_records
    from prouie_pl.reports import latest_metrics

    args = args_for(tmp_path)
    sa.write_subset(demo_data_dir(), args.data_dir, args.datasets, args.train, args.test, seed=0, n_dev=args.dev)
    assert [len(load_records(args.data_dir, split, datasets=args.datasets)) for split in ("train", "dev", "test")] == [48, 6, 9]
    cm = sa.STAGES[0]
    info = sa.train_stage(cm, args, seed=1)
    assert info["cost"]["steps"] == 6 and info["cost"]["tokens"] > 0 and info["cost"]["completions"] == 0
    assert 0 < info["cost"]["validation_seconds"] < info["cost"]["seconds"]
    # one phase per epoch of `unit` steps: NER 1, NER+RE 2, then NER+RE+EE 3
    folder = args.root / "cm"
    phases = [int(float(r["train/phase"])) for r in latest_metrics(folder) if r.get("train/phase")]
    assert phases == [0, 1, 1, 2, 2, 2]
    assert len(sa.dev_curve(folder)) == 3  # a dev check every two epochs
    records, outputs = _bootstrap.read_predictions(folder, load_records(args.data_dir, "test", datasets=args.datasets))
    assert sorted(r.dataset for r in records) == ["DemoEE"] * 3 + ["DemoNER"] * 3 + ["DemoRE"] * 3 and len(outputs) == 9
    shapes = sa.answer_shapes(folder)
    assert shapes["n"] == 9 and shapes["empty"] == sum(o.strip() in ("", "{}") for o in outputs)
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert sa.train_stage(cm, args, seed=1) == info  # reused
