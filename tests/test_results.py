"""The in-memory test result: scoring rows into it, the one parse-failure rule, the files written from it, and
the generation evaluator keeping it after ``test``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from prouie_pl.callbacks import GenerationEvaluator
from prouie_pl.results import EvalResult, Prediction, answer_problem
from prouie_pl.schema import Argument, Entity, Event, LabelSchema, Record, Relation
from prouie_pl.scoring import Scorer, parse_failures

NER_S = LabelSchema("NER", ("person", "location"))
RE_S = LabelSchema("RE", ("work for",))
EE_S = LabelSchema("EE", ("attack",), {"attack": ("attacker", "target")})


def ner(i, *names):
    return Record(f"ner sentence {i}", "NER", "A", NER_S, index=i, entities=tuple(Entity(n, "person") for n in names))


def rel(i, head, tail):
    return Record(f"re sentence {i}", "RE", "R", RE_S, index=i, relations=(Relation(Entity(head, "x"), "work for", Entity(tail, "y")),))


def ev(i, trigger, attacker):
    return Record(f"ee sentence {i}", "EE", "E", EE_S, index=i, events=(Event(trigger, "attack", None, (Argument(attacker, "attacker"),)),))


# (record, raw output, cut by the length limit): 9 answers, 5 of them parse failures, 2 blank, 3 without structures
ROWS = [
    (ner(0, "Ann"), '{"person": "Ann; Zed"}', False),        # Ann right, Zed spurious
    (ner(1, "Bob"), '{"person": "Bob"', True),               # truncated JSON: Bob still counts, a parse failure
    (ner(2, "Cy"), "", False),                               # blank: a parse failure
    (ner(3, "Di"), "Di is a person.", False),                # no JSON object: a parse failure
    (ner(4), "{}", False),                                   # clean and empty: no structures, not a failure
    (rel(0, "Ann", "IBM"), '{"work for": "Ann -> IBM"}', False),
    (rel(1, "Bob", "SAP"), "oops", False),                   # a failure, counted once though RE has two metrics
    (ev(0, "bombed", "rebels"), '{"attack": "bombed: Attacker: rebels"}', False),
    (ev(1, "fired", "soldiers"), "   ", False),              # blank: a failure, counted once though EE has two metrics
]
EXPECTED_PROBLEMS = [None, None, "blank", "no structures", "no structures", None, "no structures", None, "blank"]


def test_parse_failures_counts_each_failed_answer_once_per_data_set():
    sc = Scorer()
    for rec, out, _ in ROWS:
        sc.add(rec, out)
    report = sc.report()
    per_metric = {m: sum(d["parse_failures"] for d in t["datasets"].values()) for m, t in report["tasks"].items()}
    assert per_metric == {"NER": 3, "RE_strict": 1, "RE_boundary": 1, "EE_trigger": 1, "EE_argument": 1}
    assert parse_failures(report) == 5
    # a missing prediction is scored as empty but is not a parse failure
    sc.add(ner(5, "Eve"), None)
    assert parse_failures(sc.report()) == 5


def test_answer_problem_tells_blank_from_structure_less_answers():
    assert [answer_problem(out, rec) for rec, out, _ in ROWS] == EXPECTED_PROBLEMS
    assert answer_problem(None, ner(0)) == "blank"
    assert answer_problem("no json here", None) is None  # without the record the parser cannot be asked


def test_score_orders_predictions_and_fills_the_report():
    result = EvalResult.score(reversed(ROWS), "strict", "test")
    assert [p.uid for p in result.predictions] == sorted(rec.uid for rec, _, _ in ROWS)
    assert result.predictions[0] == Prediction("EE", "E", 0, '{"attack": "bombed: Attacker: rebels"}', False)
    assert result.split == "test" and result.n == 9 and result.truncated == 1 and result.parse_failures == 5
    ner_a = result.tasks["NER"]["datasets"]["A"]
    assert (ner_a["tp"], ner_a["fp"], ner_a["fn"], ner_a["n"], ner_a["parse_failures"]) == (2, 1, 2, 5, 3)
    assert ner_a["f1"] == pytest.approx(57.1429, abs=1e-4)  # P 2/3, R 1/2
    assert result.task_scores == pytest.approx({"NER": 57.1429, "RE": 66.6667, "EE": 66.6667}, abs=1e-4)
    assert result.overall_f1 == pytest.approx((57.1429 + 2 * 66.6667) / 3, abs=1e-4)
    assert list(result.report) == ["mode", "tasks", "overall_f1", "truncated_outputs", "looped_outputs", "n", "split"]
    assert result.outputs()[("NER", "A", 3)] == "Di is a person."
    assert "split" not in EvalResult.score(ROWS).report  # validation results carry no split


def test_write_and_load_round_trip(tmp_path):
    result = EvalResult.score(ROWS, "strict", "test")
    preds, report = result.write(tmp_path / "run")
    assert json.loads(report.read_text()) == result.report
    lines = [json.loads(line) for line in preds.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {"task": "EE", "dataset": "E", "index": 0, "output": '{"attack": "bombed: Attacker: rebels"}', "truncated": False}
    assert [x["truncated"] for x in lines].count(True) == 1 and len(lines) == 9
    assert EvalResult.load(tmp_path / "run") == result
    (tmp_path / "run" / "predictions.jsonl").unlink()
    alone = EvalResult.load(tmp_path / "run")
    assert alone.report == result.report and alone.predictions == [] and alone.parse_failures == 5


def test_answers_the_loop_guard_ended_are_counted_written_and_read_back(tmp_path):
    rows = [(rec, out, cut, None, cut) for rec, out, cut in ROWS]  # the one cut answer was ended for looping
    result = EvalResult.score(rows, "strict", "test")
    assert (result.looped, result.truncated) == (1, 1) and EvalResult.score(ROWS).looped == 0
    assert result.overall_f1 == EvalResult.score(ROWS).overall_f1  # the flag changes no score
    preds, _ = result.write(tmp_path / "run")
    lines = [json.loads(line) for line in preds.read_text(encoding="utf-8").splitlines()]
    assert [(x["index"], x["truncated"]) for x in lines if x.get("looped")] == [(1, True)]
    assert EvalResult.load(tmp_path / "run") == result


class _Module:
    def __init__(self):
        self.logged = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = value


def test_generation_evaluator_keeps_the_test_result_it_writes(tmp_path, capsys):
    trainer = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path), sanity_checking=False, datamodule=None)
    module = _Module()
    evaluator = GenerationEvaluator(sample_rows=0)
    evaluator.on_test_epoch_start(trainer, module)
    for batch in (ROWS[5:], ROWS[:5]):  # batches in another order than the sorted result
        evaluator.on_test_batch_end(trainer, module, {"records": [r for r, _, _ in batch], "outputs": [o for _, o, _ in batch],
                                                      "truncated": [c for _, _, c in batch]}, None, 0)
    evaluator.on_test_epoch_end(trainer, module)
    result = evaluator.last_result
    assert result == EvalResult.score(ROWS, "strict", "test")
    assert evaluator.last_report is result.report
    assert json.loads((tmp_path / "report.json").read_text()) == result.report
    assert EvalResult.load(tmp_path) == result
    assert module.logged["test/parse_failure_rate"] == pytest.approx(5 / 9)
    assert module.logged["test/truncated_rate"] == pytest.approx(1 / 9)
    assert module.logged["test/looped_rate"] == 0
    assert module.logged["test/f1"] == pytest.approx(result.overall_f1)
    assert module.logged["test/f1_NER"] == pytest.approx(57.1429, abs=1e-4)
    assert "wrote" in capsys.readouterr().out
