"""Unit scores: the decoder's token log-probabilities, the tokens that write a unit, thresholds, calibration."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prouie_pl.confidence import (Calibration, check_threshold, combine, fit_temperature, keep_unit, reliability,
                                  score_answer, unit_correctness, unit_token_sets)
from prouie_pl.decoding import decode_prompts
from prouie_pl.parser import parse_output
from prouie_pl.results import EvalResult
from prouie_pl.rewards import completion_token_ends
from prouie_pl.schema import Entity, LabelSchema, Record
# the decoding tests' models and their one-thread setting (pytest fixtures, imported to be found here)
from test_decoding import PAD, gemma, llama, one_thread  # noqa: F401


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def prompts_for(vocab: int, lengths, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def forward_logprobs(model, prompt: list[int], completion: list[int], processor=None) -> list[float]:
    """Log-probability of each completion token from one forward pass over prompt + completion (no cache, no
    padding), after ``processor`` when given."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].to(torch.float32)
    out = []
    for t, tok in enumerate(completion):
        scores = logits[len(prompt) + t - 1].unsqueeze(0)
        if processor is not None:
            scores = processor(ids[:, :len(prompt) + t], scores.clone())
        out.append(float(torch.log_softmax(scores, dim=-1)[0, tok]))
    return out


class KeepFew:
    """A processor that allows only a few token ids (a stand-in for the schema constraint)."""

    def __init__(self, allowed):
        self.allowed = torch.tensor(allowed)

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, float("-inf"))
        out[:, self.allowed] = scores[:, self.allowed]
        return out


@pytest.mark.parametrize("engine", ["loop", "generate"])
@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_decoded_token_logprobs_equal_a_separate_forward_pass(request, name, engine):
    model = request.getfixturevalue(name)
    vocab = model.config.vocab_size
    prompts = prompts_for(vocab, [9, 5, 12], seed=3)
    stops = [1]
    c = decode_prompts(model, prompts, batch_size=3, max_new_tokens=10, stop_ids=stops, pad_id=PAD, engine=engine,
                       with_logprobs=True)
    assert c.logprobs is not None and c.logprobs.shape == c.ids.shape
    for i, p in enumerate(prompts):
        n = int(c.lengths[i])
        toks = c.ids[i, :n].tolist()
        want = forward_logprobs(model, p, toks)
        got = c.logprobs[i, :n].tolist()
        assert got == pytest.approx(want, abs=2e-4), (name, engine, i)
        assert all(v == 0.0 for v in c.logprobs[i, n:].tolist())  # nothing after the stop


def test_constrained_logprobs_are_under_the_constrained_distribution(llama):
    prompts = prompts_for(llama.config.vocab_size, [7, 10], seed=5)
    allowed = [5, 17, 40, 1]
    c = decode_prompts(llama, prompts, batch_size=2, max_new_tokens=6, stop_ids=[1], pad_id=PAD,
                       processor_for=lambda idx, width: KeepFew(allowed), with_logprobs=True)
    for i, p in enumerate(prompts):
        n = int(c.lengths[i])
        toks = c.ids[i, :n].tolist()
        assert set(toks) <= set(allowed)
        want = forward_logprobs(llama, p, toks, processor=KeepFew(allowed))
        assert c.logprobs[i, :n].tolist() == pytest.approx(want, abs=2e-4)
        # and not the unconstrained ones: those are spread over the whole vocabulary, far lower
        free = forward_logprobs(llama, p, toks)
        assert sum(free) < sum(want) - 1.0


def test_without_the_flag_completions_carry_no_logprobs(llama):
    c = decode_prompts(llama, prompts_for(llama.config.vocab_size, [6], 1), batch_size=1, max_new_tokens=4, stop_ids=[1], pad_id=PAD)
    assert c.logprobs is None


# ------------------------------------------------------------------------------------------ token sets


def token_char_ranges(tokenizer, ids):
    """(start, end) of every token in the decoded answer, from decoding prefixes (independent of
    :func:`completion_token_ends`' piecewise decode)."""
    out, prev = [], 0
    for k in range(1, len(ids) + 1):
        end = len(tokenizer.decode(ids[:k], skip_special_tokens=True))
        out.append((prev, end))
        prev = end
    return out


def overlapping(ranges, a, b):
    return {t for t, (s, e) in enumerate(ranges) if s < b and e > a}


def test_a_units_score_is_the_product_over_its_step_and_its_label(tokenizer):
    answer = '{"person": "John; Mary", "location": "Paris"}'
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == answer
    g = torch.Generator().manual_seed(0)
    lps = (-torch.rand(len(ids), generator=g) * 0.7).tolist()
    scored = score_answer(tokenizer, answer, ids, lps, "NER")
    assert [u.text for u in scored.units] == ["John", "Mary", "Paris"]

    ranges = token_char_ranges(tokenizer, ids)
    ends = {"John": answer.index("John") + 4, "Mary": answer.index("Mary") + 4, "Paris": answer.index("Paris") + 5}
    last_tok = {k: min(t for t, (s, e) in enumerate(ranges) if e >= v) for k, v in ends.items()}
    person = overlapping(ranges, answer.index('"person"'), answer.index('"person"') + 8)
    location = overlapping(ranges, answer.index('"location"'), answer.index('"location"') + 10)
    want_sets = {
        "John": set(range(0, last_tok["John"] + 1)) | person,
        "Mary": set(range(last_tok["John"] + 1, last_tok["Mary"] + 1)) | person,
        "Paris": set(range(last_tok["Mary"] + 1, last_tok["Paris"] + 1)) | location,
    }
    for u, got in zip(scored.units, scored.scores):
        want = math.exp(sum(lps[t] for t in want_sets[u.text]))
        assert got == pytest.approx(want, rel=1e-6), u.text
    # "Mary" did not write the key, yet depends on it: its score holds the key's tokens, the step alone does not
    text, tends = completion_token_ends(tokenizer, ids)
    step, label = unit_token_sets(text, tends, scored.units, len(ids))[1]
    assert not set(step) & person and set(label) == person
    assert combine(lps, step, label, "step") > combine(lps, step, label, "step_label")


def test_scores_never_raise_on_malformed_answers(tokenizer):
    for answer in ['', 'no json at all', '{"person": "Jo', '{"person": ["A", "B"', '{{{"', '{"person": "A; ; ;"}']:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
        scored = score_answer(tokenizer, answer, ids, [-0.1] * len(ids), "NER")
        assert len(scored.scores) == len(scored.units)
        assert all(0.0 <= s <= 1.0 for s in scored.scores)
    # token log-probabilities that do not fit the answer (too few) still give a score for every unit
    answer = '{"person": "Ann; Bob"}'
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    scored = score_answer(tokenizer, answer, ids, [-0.2] * 2, "NER")
    assert len(scored.scores) == 2


# ------------------------------------------------------------------------------------------ thresholds


def ner_record(entities, sentence="John met Mary in Paris", index=0):
    schema = LabelSchema("NER", ("person", "location"))
    return Record(sentence, "NER", "Toy", schema, index=index, split="test", entities=tuple(Entity(n, t) for n, t in entities))


def test_threshold_zero_changes_nothing_and_one_keeps_nothing():
    rec = ner_record([("John", "person"), ("Paris", "location")])
    out = '{"person": "John; Mary", "location": "Paris"}'
    rows = [(rec, out, False, [0.9, 0.2, 0.6])]
    base = EvalResult.score([(rec, out, False)])
    zero = EvalResult.score(rows, threshold=0.0)
    assert zero.report["tasks"] == base.report["tasks"]
    one = EvalResult.score(rows, threshold=1.0)
    ner = one.report["tasks"]["NER"]["datasets"]["Toy"]
    assert (ner["tp"], ner["fp"], ner["fn"]) == (0, 0, 2)
    mid = EvalResult.score(rows, threshold=0.5).report["tasks"]["NER"]["datasets"]["Toy"]
    assert (mid["tp"], mid["fp"], mid["fn"]) == (2, 0, 0)  # the unsure wrong "Mary" is gone
    assert keep_unit(None, 0.0) and not keep_unit(None, 0.3) and not keep_unit(1.0, 1.0)
    with pytest.raises(ValueError, match="threshold"):
        check_threshold(1.5)


def test_scores_that_do_not_fit_the_output_are_refused():
    rec = ner_record([("John", "person")])
    with pytest.raises(ValueError, match="2 unit scores for 3 parsed units"):
        EvalResult.score([(rec, '{"person": "John; Mary", "location": "Paris"}', False, [0.9, 0.1])], threshold=0.5)


def test_predictions_file_keeps_scores_and_evaluate_sweeps(tmp_path):
    from prouie_pl.evaluate import threshold_sweep, read_predictions

    rec = ner_record([("John", "person"), ("Paris", "location")])
    res = EvalResult.score([(rec, '{"person": "John; Mary", "location": "Paris"}', False, [0.9, 0.2, 0.6])])
    preds, _ = res.write(tmp_path)
    row = json.loads(preds.read_text().splitlines()[0])
    assert row["unit_scores"] == [0.9, 0.2, 0.6]
    assert EvalResult.load(tmp_path).predictions[0].unit_scores == (0.9, 0.2, 0.6)
    pf = read_predictions(preds)
    sweep = threshold_sweep([rec], pf, [0.0, 0.5, 0.95])
    p = [r["metrics"]["NER/Toy"]["precision"] for r in sweep]
    rc = [r["metrics"]["NER/Toy"]["recall"] for r in sweep]
    assert p[:2] == pytest.approx([66.6667, 100.0], abs=1e-3) and rc[:2] == [100.0, 100.0]
    assert rc[2] == 0.0


# ------------------------------------------------------------------------------------------ calibration


def test_reliability_table_and_ece_count_what_they_should():
    scores = [0.95, 0.9, 0.85, 0.15, 0.1]
    correct = [True, True, False, False, False]
    table, ece = reliability(scores, correct, bins=10)
    assert sum(b["n"] for b in table) == 5
    top = [b for b in table if b["n"] and b["low"] >= 0.8]
    assert sum(b["correct"] if "correct" in b else round(b["accuracy"] * b["n"]) for b in top) == 2
    want = (1 * abs(0 - 0.85) + 1 * abs(1 - 0.9) + 1 * abs(1 - 0.95) + 1 * abs(0 - 0.15) + 1 * abs(0 - 0.1)) / 5
    assert ece == pytest.approx(want)


def test_temperature_fit_moves_overconfident_scores_toward_the_truth(tmp_path):
    # scores of 0.9 that are right half of the time: the fitted temperature brings them near 0.5
    scores = [0.9] * 200
    correct = [i % 2 == 0 for i in range(200)]
    t = fit_temperature(scores, correct)
    cal = Calibration("step_label", t)
    assert cal.apply(0.9) == pytest.approx(0.5, abs=0.02)
    _, before = reliability(scores, correct)
    _, after = reliability([cal.apply(s) for s in scores], correct)
    assert after < before - 0.3
    cal.save(tmp_path)
    assert Calibration.load(tmp_path).temperature == pytest.approx(t)
    assert Calibration.load(tmp_path / "missing").temperature == 1.0
    (tmp_path / "confidence.json").write_text("{not json")
    with pytest.raises(ValueError, match="confidence.json"):
        Calibration.load(tmp_path)


def test_unit_correctness_matches_each_gold_unit_once():
    rec = ner_record([("John", "person")])
    units = parse_output('{"person": "John; John; Paris"}', "NER", rec.schema).units
    assert unit_correctness(rec, units) == [True, False, False]


def test_evaluate_command_sweeps_thresholds_over_unit_scores(demo_dir, tmp_path, capsys):
    from prouie_pl.cli import main

    preds = tmp_path / "p.jsonl"
    assert main(["render", "--data_dir", str(demo_dir), "--format", "concise", "--out", str(preds), "--tasks", "NER"]) == 0
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    # gold answers, each unit scored: the first unit of every answer sure, the others not
    for r in rows:
        n = len(parse_output(r["output"], "NER").units)
        r["unit_scores"] = [0.9] + [0.3] * (n - 1) if n else []
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report.json"
    assert main(["evaluate", "--data_dir", str(demo_dir), "--tasks", "NER", "--predictions", str(preds), "--out", str(out),
                 "--thresholds", "0", "0.5", "1"]) == 0
    assert "threshold sweep" in capsys.readouterr().out
    sweep = json.loads(out.read_text())["threshold_sweep"]
    assert [s["threshold"] for s in sweep] == [0.0, 0.5, 1.0]
    cells = [next(iter(s["metrics"].values())) for s in sweep]
    assert cells[0]["precision"] == 100.0 and cells[0]["recall"] == 100.0
    answers_with_units = sum(1 for r in rows if r["unit_scores"])
    assert cells[1]["precision"] == 100.0 and cells[1]["tp"] == answers_with_units < cells[0]["tp"]
    assert cells[2]["tp"] == 0 and cells[2]["fp"] == 0
    for r in rows:
        r.pop("unit_scores")
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["evaluate", "--data_dir", str(demo_dir), "--tasks", "NER", "--predictions", str(preds), "--thresholds", "0.5"]) == 2
    assert "no unit_scores" in capsys.readouterr().err
