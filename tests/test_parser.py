"""The parser reads both formats, never raises, recovers what it can, and flags what it could not read."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prouie_pl.formats import render_target
from prouie_pl.parser import parse_output
from prouie_pl.schema import Argument, Entity, Event, LabelSchema, Record, Relation

NER_S = LabelSchema("NER", ("person", "location"))
RE_S = LabelSchema("RE", ("work for", "live in"))
EE_S = LabelSchema("EE", ("attack", "hire"), {"attack": ("attacker", "target"), "hire": ("employer", "employee")})
SCHEMAS = {"NER": NER_S, "RE": RE_S, "EE": EE_S}


def units(text, task="NER"):
    return [(u.kind, u.label, u.text or f"{u.head}>{u.tail}", u.role) for u in parse_output(text, task, SCHEMAS[task]).units]


def test_end_offsets_point_just_after_each_unit():
    text = '{"person": "John Smith; Mary", "location": ["Paris"]}'
    res = parse_output(text, "NER", NER_S)
    assert res.ok and [text[: u.end][-len(u.text):] for u in res.units] == ["John Smith", "Mary", "Paris"]
    ee = '{"attack": "bombed: Attacker: rebels; Target: the \\"base\\""}'
    res = parse_output(ee, "EE", EE_S)
    assert [(u.kind, u.text) for u in res.units] == [("trigger", "bombed"), ("argument", "rebels"), ("argument", 'the "base"')]
    assert ee[: res.units[0].end].endswith("bombed") and ee[: res.units[1].end].endswith("rebels")
    assert ee[: res.units[2].end].endswith('\\"base\\"')


def test_truncated_concise_output_keeps_the_complete_units():
    full = '{"person": "John Smith; Mary Jones", "location": "Paris; Rome"}'
    res = parse_output(full[:33], "NER", NER_S)  # cut inside "Mary Jones"
    assert not res.ok and res.truncated and "truncated JSON" in res.problems
    assert units(full[:33]) == [("entity", "person", "John Smith", "")]
    assert units(full[: full.index("Rome") + 2]) == [("entity", "person", "John Smith", ""), ("entity", "person", "Mary Jones", ""), ("entity", "location", "Paris", "")]
    ev = '{"attack": "bombed: Attacker: rebels; Target: the ba'
    assert units(ev, "EE") == [("trigger", "attack", "bombed", ""), ("argument", "attack", "rebels", "attacker")]
    assert units('{"work for": "Ann -> IBM; Bob -> Ac', "RE") == [("relation", "work for", "Ann>IBM", "")]
    assert units('{"person": ["John", "Ma', "NER") == [("entity", "person", "John", "")]


def test_chatty_and_sloppy_outputs_are_recovered_and_flagged():
    res = parse_output('Sure! Here it is: {"person": "John"} Hope this helps.', "NER", NER_S)
    assert not res.ok and {"text before the JSON object", "text after the JSON object"} <= set(res.problems)
    assert [u.text for u in res.units] == ["John"]
    res = parse_output("{'person': ['John', 'Mary',],}", "NER", NER_S)
    assert [u.text for u in res.units] == ["John", "Mary"] and not res.ok
    assert "single-quoted strings" in res.problems and "trailing comma" in res.problems
    res = parse_output('{"Person": "John"}', "NER", NER_S)  # label case differs: mapped, clean
    assert res.ok and res.units[0].label == "person"
    # a quote that opens no string is skipped and flagged (the units around it are kept)
    res = parse_output("""{'"person": ["John Smith"], "location": ["Paris"]}""", "NER", NER_S)
    assert not res.ok and "stray quote at offset 1" in res.problems
    assert [u.text for u in res.units] == ["John Smith", "Paris"]


def test_unknown_labels_and_roles_are_units_outside_the_schema():
    res = parse_output('{"animal": "Rex", "person": "Ann"}', "NER", NER_S)
    assert not res.ok and "unknown label 'animal'" in res.problems
    assert [(u.label, u.in_schema) for u in res.units] == [("animal", False), ("person", True)]
    res = parse_output('{"attack": "bombed: Weapon: bomb; Target: base"}', "EE", EE_S)
    assert [(u.kind, u.role, u.in_schema) for u in res.units] == [("trigger", "", True), ("argument", "Weapon", False), ("argument", "target", True)]


def test_wrong_nesting_is_flagged_and_recovered_where_possible():
    res = parse_output('{"person": [{"name": "Ann"}], "location": {"x": 1}}', "NER", NER_S)
    assert [u.text for u in res.units] == ["Ann"] and not res.ok
    res = parse_output('{"work for": {"head": "Ann", "tail": "IBM"}}', "RE", RE_S)
    assert [(u.head, u.tail) for u in res.units] == [("Ann", "IBM")] and not res.ok
    res = parse_output('["person", "Ann"]', "NER", NER_S)
    assert res.units == [] and not res.ok
    for bad in ("", "   ", "no json here", "{", "}", "{{{{", '{"person": nul', "[" * 200 + "{" * 200):
        res = parse_output(bad, "NER", NER_S)
        assert not res.ok and res.units == []


def test_both_formats_give_the_same_units():
    ev = Event("bombed", "attack", None, (Argument("rebels", "attacker"), Argument("base", "target")))
    rec = Record("s", "EE", "D", EE_S, events=(ev, Event("hired", "hire", None, (Argument("Acme", "employer"),))))
    a = parse_output(render_target(rec, "full"), "EE", EE_S)
    b = parse_output(render_target(rec, "concise"), "EE", EE_S)
    assert a.ok and b.ok
    assert [u.exact() for u in a.units] == [u.exact() for u in b.units]
    assert [u.event for u in a.units] == [0, 0, 0, 1, 1]


# ------------------------------------------------------------------ never raises (hypothesis, 10,000 outputs)

_seed_outputs = [
    render_target(Record("s", "NER", "D", NER_S, entities=(Entity("John Smith", "person"), Entity("Paris", "location"))), f)
    for f in ("full", "concise")
] + [
    render_target(Record("s", "RE", "D", RE_S, relations=(Relation(Entity("Ann"), "work for", Entity("IBM")),)), f) for f in ("full", "concise")
] + [
    render_target(Record("s", "EE", "D", EE_S, events=(Event("bombed", "attack", None, (Argument("rebels", "attacker"),)),)), f)
    for f in ("full", "concise")
]
_chars = list('{}[]:,;"\'\\ ->abcXY\nu0é')
_pieces = st.lists(st.sampled_from(_chars + ["\\u00e9", "null", "->", ": ", "; "]), max_size=4).map("".join)


@st.composite
def mutated(draw):
    base = draw(st.sampled_from(_seed_outputs))
    ops = draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 400), _pieces), max_size=6))
    s = base
    for op, pos, piece in ops:
        pos = pos % (len(s) + 1)
        if op == 0:
            s = s[:pos] + piece + s[pos:]
        elif op == 1:
            s = s[:pos] + s[pos + len(piece) + 1:]
        else:
            s = s[:pos]
    return s


@settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.one_of(st.text(max_size=200), st.lists(st.sampled_from(_chars), max_size=120).map("".join)), task=st.sampled_from(["NER", "RE", "EE"]))
def test_never_raises_on_random_text(text, task):
    res = parse_output(text, task, SCHEMAS[task])
    assert not any("internal parser error" in p for p in res.problems), res.problems
    assert all(0 <= u.end <= len(text) for u in res.units)
    if res.ok:
        json.loads(text)  # a clean parse is valid JSON


@settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=mutated(), task=st.sampled_from(["NER", "RE", "EE"]))
def test_never_raises_on_mutated_outputs(text, task):
    res = parse_output(text, task, SCHEMAS[task])
    assert not any("internal parser error" in p for p in res.problems), res.problems
    ends = [u.end for u in res.units]
    assert all(0 <= e <= len(text) for e in ends)
    if res.ok:
        json.loads(text)  # a clean parse is valid JSON
