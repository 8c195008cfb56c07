"""Prompts and the target formats, written out by hand."""

from __future__ import annotations

import json
import random

from prouie_pl.formats import build_prompt, example, render_target
from prouie_pl.parser import parse_output, units_to_structures
from prouie_pl.schema import Argument, Entity, Event, LabelSchema, Record, Relation, record_units

NER_S = LabelSchema("NER", ("person", "location", "organization"))
RE_S = LabelSchema("RE", ("work for", "live in"))
EE_S = LabelSchema("EE", ("adverse event", "therapy"), {"adverse event": ("subject", "effect"), "therapy": ("drug",)})


def ner_rec(*ents):
    return Record("s", "NER", "D", NER_S, entities=tuple(Entity(n, t) for n, t in ents))


def test_ner_full_and_concise():
    r = ner_rec(("John", "person"), ("Mary", "person"), ("Paris", "location"))
    assert render_target(r, "full") == '{"person": ["John", "Mary"], "location": ["Paris"], "organization": []}'
    assert render_target(r, "concise") == '{"person": "John; Mary", "location": "Paris"}'
    assert render_target(ner_rec(), "full") == '{"person": [], "location": [], "organization": []}'
    assert render_target(ner_rec(), "concise") == "{}"


def test_re_full_and_concise():
    r = Record("s", "RE", "D", RE_S, relations=(Relation(Entity("Ann"), "work for", Entity("IBM")), Relation(Entity("Bo"), "work for", Entity("Acme"))))
    assert render_target(r, "full") == '{"work for": [{"head": "Ann", "tail": "IBM"}, {"head": "Bo", "tail": "Acme"}], "live in": []}'
    assert render_target(r, "concise") == '{"work for": "Ann -> IBM; Bo -> Acme"}'


def test_ee_full_and_concise_match_the_documented_example():
    ev = Event("developed", "adverse event", None, (Argument("patient", "subject"), Argument("a hemorrhagic lesion", "effect")))
    r = Record("s", "EE", "D", EE_S, events=(ev,))
    assert render_target(r, "concise") == '{"adverse event": "developed: Subject: patient; Effect: a hemorrhagic lesion"}'
    assert json.loads(render_target(r, "full")) == {
        "adverse event": [{"trigger": "developed", "arguments": {"subject": ["patient"], "effect": ["a hemorrhagic lesion"]}}],
        "therapy": [],
    }
    two = Record("s", "EE", "D", EE_S, events=(ev, Event("got", "adverse event", None, ())))
    assert json.loads(render_target(two, "concise")) == {"adverse event": ["developed: Subject: patient; Effect: a hemorrhagic lesion", "got"]}


def test_concise_falls_back_to_structured_values_when_the_compact_syntax_is_ambiguous():
    r = ner_rec(("Mike May; The Band", "person"), ("Ann", "person"))
    assert json.loads(render_target(r, "concise")) == {"person": ["Mike May; The Band", "Ann"]}
    rr = Record("s", "RE", "D", RE_S, relations=(Relation(Entity("a -> b"), "live in", Entity("c")),))
    assert json.loads(render_target(rr, "concise")) == {"live in": [{"head": "a -> b", "tail": "c"}]}
    ev = Event("t: x", "therapy", None, (Argument("aspirin; 5 mg", "drug"),))
    re_ = Record("s", "EE", "D", EE_S, events=(ev,))
    assert json.loads(render_target(re_, "concise")) == {"therapy": [{"trigger": "t: x", "arguments": {"drug": ["aspirin; 5 mg"]}}]}
    for rec in (r, rr, re_):
        for fmt in ("full", "concise"):
            parsed = parse_output(render_target(rec, fmt), rec.task, rec.schema)
            assert parsed.ok, parsed.problems
            assert units_to_structures(parsed.units) == units_to_structures(record_units(rec))


def test_keyed_keeps_every_label_with_concise_values_and_parses_back():
    r = ner_rec(("John", "person"), ("Mary", "person"), ("Paris", "location"))
    assert render_target(r, "keyed") == '{"person": "John; Mary", "location": "Paris", "organization": ""}'
    assert render_target(ner_rec(), "keyed") == '{"person": "", "location": "", "organization": ""}'
    rr = Record("s", "RE", "D", RE_S, relations=(Relation(Entity("Ann"), "live in", Entity("Rome")),))
    assert render_target(rr, "keyed") == '{"work for": "", "live in": "Ann -> Rome"}'
    ev = Event("developed", "adverse event", None, (Argument("patient", "subject"),))
    re_ = Record("s", "EE", "D", EE_S, events=(ev,))
    assert render_target(re_, "keyed") == '{"adverse event": "developed: Subject: patient", "therapy": ""}'
    odd = ner_rec(("Mike May; The Band", "person"))
    assert json.loads(render_target(odd, "keyed")) == {"person": ["Mike May; The Band"], "location": "", "organization": ""}
    for rec in (r, ner_rec(), rr, re_, odd, Record("s", "EE", "D", EE_S)):
        parsed = parse_output(render_target(rec, "keyed"), rec.task, rec.schema)
        assert parsed.ok, parsed.problems
        assert units_to_structures(parsed.units) == units_to_structures(record_units(rec))
    assert '("" when there is none)' in build_prompt(r, "keyed")


def test_prompt_names_task_schema_format_and_text():
    r = ner_rec()
    p = build_prompt(r, "full")
    assert p.splitlines()[0].startswith("Task: named entity recognition")
    assert "Entity types: person, location, organization." in p
    assert "([] when there is none)" in p and p.endswith("Text: s")
    assert '"; "' in build_prompt(r, "concise")
    ee = Record("s", "EE", "D", EE_S)
    assert "adverse event (subject, effect); therapy (drug)" in build_prompt(ee, "concise")


def test_shuffled_labels_reorder_prompt_and_full_target_together():
    r = ner_rec(("John", "person"))
    seen = set()
    for seed in range(20):
        prompt, target = example(r, "full", shuffle_labels=True, rng=random.Random(seed))
        order = prompt.splitlines()[1][len("Entity types: "):-1].split(", ")
        assert list(json.loads(target)) == order
        seen.add(tuple(order))
    assert len(seen) > 1
