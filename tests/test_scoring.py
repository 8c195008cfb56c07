"""Hand-computed scorer cases for every metric, in strict and InstructUIE-compatible modes."""

from __future__ import annotations

import pytest


def approx(x):
    return pytest.approx(x, abs=1e-3)

from prouie_pl.schema import Argument, Entity, Event, LabelSchema, Record, Relation
from prouie_pl.scoring import Scorer, overall_f1, units_f1
from prouie_pl.scoring_instructuie import gold_string, iuie_normalize, ner_items, re_counts_na, re_items
from prouie_pl.parser import parse_output

NER_S = LabelSchema("NER", ("person", "location"))
RE_S = LabelSchema("RE", ("work for", "located in"))
EE_S = LabelSchema("EE", ("attack",), {"attack": ("attacker", "target")})


def ner(ds, *ents, i=0):
    return Record("s", "NER", ds, NER_S, index=i, entities=tuple(Entity(n, t) for n, t in ents))


def rel(ds, *triples, i=0):
    return Record("s", "RE", ds, RE_S, index=i, relations=tuple(Relation(Entity(h, "x"), r, Entity(t, "y")) for h, r, t in triples))


def ds_entry(report, metric, ds):
    return report["tasks"][metric]["datasets"][ds]


def test_ner_strict_micro_counts_and_normalisation():
    sc = Scorer()
    # record 1: gold {person John Smith, location Paris}; prediction has John smith (case/space differ), a
    # duplicate, and a wrong type for Paris -> tp 1, fp 1, fn 1
    sc.add(ner("A", ("John Smith", "person"), ("Paris", "location")), '{"person": "john  smith; John Smith", "location": [], "person ": "Paris"}')
    # record 2: empty gold, empty prediction -> nothing
    sc.add(ner("A", i=1), "{}")
    # record 3: gold Rome, predicted nothing -> fn 1
    sc.add(ner("A", ("Rome", "location"), i=2), '{"location": []}')
    e = ds_entry(sc.report(), "NER", "A")
    assert (e["tp"], e["fp"], e["fn"]) == (1, 1, 2)
    assert e["precision"] == approx(50.0) and e["recall"] == approx(100 / 3)
    assert e["f1"] == approx(40.0)
    assert e["n"] == 3 and e["parse_failures"] == 0


def test_task_average_is_unweighted_over_data_sets_and_failures_are_counted():
    sc = Scorer()
    sc.add(ner("A", ("Ann", "person")), '{"person": "Ann"}')  # A: F1 100
    for i in range(3):  # B: 3 records, all wrong -> F1 0, one of them broken JSON
        sc.add(ner("B", ("Bob", "person"), i=i), '{"person": "Bo' if i == 0 else '{"location": "Bob"}')
    rep = sc.report()
    assert rep["tasks"]["NER"]["average_f1"] == approx(50.0)
    assert ds_entry(rep, "NER", "B")["parse_failures"] == 1
    assert overall_f1(rep) == approx(50.0)


def test_re_strict_and_boundary():
    sc = Scorer()
    gold = rel("R", ("Ann", "work for", "IBM"), ("IBM", "located in", "Oslo"))
    # one right, one with the wrong type (boundary right), one reversed (both wrong)
    sc.add(gold, '{"work for": "Ann -> IBM; Oslo -> IBM", "work for ": "IBM -> Oslo"}')
    rep = sc.report()
    s, b = ds_entry(rep, "RE_strict", "R"), ds_entry(rep, "RE_boundary", "R")
    assert (s["tp"], s["fp"], s["fn"]) == (1, 2, 1)
    assert (b["tp"], b["fp"], b["fn"]) == (2, 1, 0)
    assert s["f1"] == approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5) * 100)
    assert b["f1"] == approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1.0) * 100)


def test_ee_trigger_and_argument():
    ev = Event("bombed", "attack", None, (Argument("rebels", "attacker"), Argument("base", "target")))
    rec = Record("s", "EE", "E", EE_S, events=(ev,))
    sc = Scorer()
    # trigger right; arguments: rebels right, base with wrong role, plus a spurious one
    sc.add(rec, '{"attack": "bombed: Attacker: rebels; Attacker: base; Target: city"}')
    rep = sc.report()
    t, a = ds_entry(rep, "EE_trigger", "E"), ds_entry(rep, "EE_argument", "E")
    assert (t["tp"], t["fp"], t["fn"]) == (1, 0, 0) and t["f1"] == 100.0
    assert (a["tp"], a["fp"], a["fn"]) == (1, 2, 1)
    assert a["precision"] == approx(100 / 3) and a["recall"] == approx(50.0)


def test_units_f1_used_by_rewards():
    rec = ner("A", ("Ann", "person"), ("Oslo", "location"))
    res = parse_output('{"person": "Ann; Bob"}', "NER", NER_S)
    from prouie_pl.schema import record_units

    assert units_f1(record_units(rec), res.units, "NER") == approx(0.5)
    assert units_f1([], [], "NER") == 1.0


# ------------------------------------------------------------------ InstructUIE compatibility


def test_instructuie_normalisation_quirks():
    assert iuie_normalize("  Location :  New   York ,  USA ") == "located:new york,usa"
    # the curly quote is replaced after spaces are removed, so the space before it stays
    assert iuie_normalize("{A};;b..c,,d \u2019s") == "a;b.c,d 's"
    assert iuie_normalize("x ( y ) - z _ w ' v") == "x(y)-z_w'v"


def test_instructuie_gold_strings():
    assert gold_string(ner("A", ("Ann", "person"), ("Oslo", "location"))) == " person: Ann; location: Oslo"
    assert gold_string(ner("A")) == " None"
    assert gold_string(rel("R", ("Ann", "work for", "IBM"))) == " work for: Ann, IBM"


def test_instructuie_ner_none_item_trailing_semicolon_and_location_rewrite():
    sc = Scorer("instructuie")
    # empty gold answered with None: one true positive (strict mode would add nothing)
    sc.add(ner("A"), "None")
    # a trailing ';' adds an empty item -> a false positive
    sc.add(ner("A", ("Ann", "person"), i=1), "person: Ann;")
    # 'location' becomes 'located' on both sides, and duplicates collapse into one item
    sc.add(ner("A", ("Oslo", "location"), i=2), "location: oslo; location:Oslo")
    e = ds_entry(sc.report(), "NER", "A")
    assert (e["tp"], e["fp"], e["fn"]) == (3, 1, 0)
    assert e["f1"] == approx(2 * 0.75 / 1.75 * 100)
    strict = Scorer()
    strict.add(ner("A"), "{}")
    assert ds_entry(strict.report(), "NER", "A")["tp"] == 0


def test_instructuie_ner_scores_json_outputs_through_the_text_form():
    sc = Scorer("instructuie")
    sc.add(ner("A"), "{}")  # parsed, written as None -> matches the None gold item
    sc.add(ner("A", ("Ann", "person"), i=1), '{"person": "Ann", "location": "Bergen"}')
    e = ds_entry(sc.report(), "NER", "A")
    assert (e["tp"], e["fp"], e["fn"]) == (2, 1, 0)


def test_instructuie_re_items_need_a_colon_and_order_matters():
    sc = Scorer("instructuie")
    gold = rel("R", ("Ann", "work for", "IBM"), ("IBM", "located in", "Oslo"))
    # reversed pair is wrong, an item without ':' is ignored, spacing around ',' does not matter
    sc.add(gold, "work for: IBM, Ann; located in : IBM ,Oslo; junk without colon")
    e = ds_entry(sc.report(), "RE_strict", "R")
    assert (e["tp"], e["fp"], e["fn"]) == (1, 1, 1)
    sc2 = Scorer("instructuie")
    sc2.add(rel("R", i=0), "None")  # no relations, None predicted: no items either side
    e2 = ds_entry(sc2.report(), "RE_strict", "R")
    assert (e2["tp"], e2["fp"], e2["fn"]) == (0, 0, 0)
    assert re_items(" None") == set()
    assert ner_items(" None") == {"none"}


def test_instructuie_na_rule():
    # gold (a,NA,b)-style items: a prediction giving a non-NA relation for the same pair blocks the TP
    assert re_counts_na({"x:a,na,b"}, {"x:a,na,b"}) == (1, 0, 0)
    assert re_counts_na({"x:a,na,b"}, {"x:a,rel,b"}) == (0, 1, 0)
    assert re_counts_na({"x:a,b"}, set()) == (0, 0, 1)
