"""The real benchmark data (../shared/data/uie): every record of every split survives render -> parse, and
render -> evaluate scores 100 on every test split."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import needs_shared_data
from prouie_pl.cli import main
from prouie_pl.formats import FORMATS, render_target
from prouie_pl.parser import parse_output, units_to_structures
from prouie_pl.reader import SPLITS, discover, read_split_file
from prouie_pl.schema import record_units

pytestmark = needs_shared_data


def test_eighteen_data_sets_are_found(shared_data):
    found = Counter(d.task for d in discover(shared_data))
    assert found == {"NER": 10, "RE": 5, "EE": 3}


@pytest.mark.parametrize("task", ["NER", "RE", "EE"])
def test_render_parse_round_trip_on_every_record(shared_data, task):
    checked = 0
    failures = []
    for info in discover(shared_data, tasks=[task]):
        for split in SPLITS:
            for rec in read_split_file(info, split):
                gold = units_to_structures(record_units(rec))
                for fmt in FORMATS:
                    res = parse_output(render_target(rec, fmt), rec.task, rec.schema)
                    if not res.ok or units_to_structures(res.units) != gold:
                        failures.append((info.id, split, rec.index, fmt, res.problems))
                checked += 1
    assert not failures, failures[:5]
    assert checked > 1000


@pytest.mark.parametrize("fmt", FORMATS)
def test_render_then_evaluate_scores_100_everywhere(shared_data, tmp_path, fmt):
    preds = tmp_path / "pred.jsonl"
    report_path = tmp_path / "report.json"
    assert main(["render", "--data_dir", str(shared_data), "--split", "test", "--format", fmt, "--out", str(preds)]) == 0
    assert main(["evaluate", "--data_dir", str(shared_data), "--split", "test", "--predictions", str(preds), "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["mode"] == "strict"
    assert sorted(report["tasks"]) == ["EE_argument", "EE_trigger", "NER", "RE_boundary", "RE_strict"]
    n_datasets = 0
    for metric, entry in report["tasks"].items():
        assert entry["average_f1"] == 100.0, metric
        for ds, v in entry["datasets"].items():
            assert v["f1"] == 100.0 and v["parse_failures"] == 0 and v["n"] > 0, (metric, ds)
        n_datasets += len(entry["datasets"]) if metric in ("NER", "RE_strict", "EE_trigger") else 0
    assert n_datasets == 18
    assert report["missing_predictions"] == 0 and report["unknown_predictions"] == 0
