"""Stepwise fine-grained rewards, computed by hand for NER, RE and EE."""

from __future__ import annotations

import pytest

from prouie_pl.rewards import RewardSettings, completion_token_ends, sfr_reward, token_index
from prouie_pl.schema import Argument, Entity, Event, LabelSchema, Record, Relation

NER_S = LabelSchema("NER", ("person", "location"))
RE_S = LabelSchema("RE", ("work for",))
EE_S = LabelSchema("EE", ("attack",), {"attack": ("attacker", "target")})

GOLD_NER = Record("s", "NER", "D", NER_S, entities=(Entity("John", "person"), Entity("Paris", "location")))
GOLD_RE = Record("s", "RE", "D", RE_S, relations=(Relation(Entity("Ann"), "work for", Entity("IBM")),))
GOLD_EE = Record("s", "EE", "D", EE_S, events=(Event("bombed", "attack", None, (Argument("rebels", "attacker"), Argument("base", "target"))),))


def char_tokens(text):
    """One token per character: token i ends at offset i + 1, so a unit ending at offset e ends at token e - 1."""
    return list(range(1, len(text) + 1))


def steps_of(text, record, **kw):
    return sfr_reward(text, char_tokens(text), record, RewardSettings(**kw) if kw else None)


def test_ner_correct_repeat_wrong_unknown_and_missed():
    text = '{"person": "John; John; Mary", "animal": "Rex"}'
    res = steps_of(text, GOLD_NER)
    assert [r for _, r in res.steps] == [1.0, -1.0, -1.0, -1.0, -2.0]  # final: format -1 (unknown label) + missed Paris -1
    ends = [text.index("John") + 4, text.index("John; Mary") + 4, text.index("Mary") + 4, text.index("Rex") + 3]
    assert [t for t, _ in res.steps] == [e - 1 for e in ends] + [len(text) - 1]
    assert res.f1 == pytest.approx(0.4)  # P 1/3, R 1/2
    assert res.outcome == pytest.approx(0.4 - 1.0) and not res.parsed_ok and res.missed == 1
    assert res.correct == {"entity": 1} and res.predicted == {"entity": 4}


def test_re_repeat_is_penalised_and_a_clean_finish_is_rewarded():
    res = steps_of('{"work for": "Ann -> IBM; ann -> ibm"}', GOLD_RE)
    assert [r for _, r in res.steps] == [1.0, -1.0, 1.0]  # final: format 0 + nothing missed + finish 1
    assert res.f1 == 1.0 and res.outcome == 1.0 and res.total == 1.0
    plain = steps_of('{"work for": "Ann -> IBM; ann -> ibm"}', GOLD_RE, finish=0.0)
    assert [r for _, r in plain.steps] == [1.0, -1.0, 0.0]


def test_ee_trigger_arguments_unknown_role_and_weights():
    text = '{"attack": "bombed: Attacker: rebels; Weapon: bomb"}'
    res = steps_of(text, GOLD_EE)
    assert [r for _, r in res.steps] == [1.0, 1.0, -1.0, -2.0]  # final: format -1 (unknown role) + missed base -1
    assert res.f1 == pytest.approx(2 / 3)
    weighted = steps_of(text, GOLD_EE, weights={"argument": 0.5})
    assert [r for _, r in weighted.steps] == [1.0, 0.5, -0.5, -1.5]


def test_invalid_and_truncated_json():
    res = steps_of("not json at all", GOLD_NER)
    assert res.steps == [(len("not json at all") - 1, -3.0)]  # format -1, two missed units
    assert res.f1 == 0.0 and res.outcome == -1.0
    cut = '{"person": "John; Pa'
    res = steps_of(cut, GOLD_NER)
    assert [r for _, r in res.steps] == [1.0, -2.0]
    assert res.f1 == pytest.approx(2 / 3) and res.outcome == pytest.approx(2 / 3 - 1.0)


def test_empty_gold_record():
    empty = Record("s", "NER", "D", NER_S)
    res = steps_of("{}", empty)
    assert res.steps == [(1, 1.0)] and res.f1 == 1.0 and res.outcome == 1.0
    res = steps_of('{"person": "John"}', empty)
    assert [r for _, r in res.steps] == [-1.0, 1.0] and res.f1 == 0.0 and res.outcome == 0.0


def test_final_step_lands_on_the_end_token():
    text = '{"person": "John"}'
    ends = char_tokens(text) + [len(text)]  # an end token that adds no text
    res = sfr_reward(text, ends, GOLD_NER, n_tokens=len(ends))
    assert res.steps[-1][0] == len(ends) - 1
    assert token_index([3, 5, 9], 4) == 1 and token_index([3, 5, 9], 5) == 1 and token_index([3, 5, 9], 50) == 2


def test_settings_reject_unknown_kinds():
    with pytest.raises(ValueError, match="unknown unit kinds"):
        RewardSettings(weights={"entity": 1.0, "span": 2.0})


def test_token_offsets_with_a_real_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = '{"person": "Zoë Ångström; 東京"}'
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    decoded, ends = completion_token_ends(tok, ids)
    assert decoded == text and len(ends) == len(ids)
    assert ends == sorted(ends) and ends[-1] == len(text)
    for i in range(len(ids) - 1):  # every offset is where the prefix of tokens ends
        prefix = tok.decode(ids[: i + 1])
        if "\ufffd" not in prefix:
            assert ends[i] == len(prefix)
    res = sfr_reward(decoded, ends, Record("s", "NER", "D", NER_S, entities=(Entity("Zoë Ångström", "person"),)), n_tokens=len(ids))
    assert res.steps[0][1] == 1.0
    assert tok.decode(ids[: res.steps[0][0] + 1]).endswith("Ångström")
