"""The IE INSTRUCTIONS reader: layout, selection, caps, and one clear line per bad record."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import event, ner, rel
from prouie_pl.cli import main
from prouie_pl.reader import DataError, LoadReport, discover, load_records, write_dataset


@pytest.fixture()
def root(tmp_path):
    write_dataset(tmp_path, "NER", "My NER set", ["person", "location"], {
        "train": [ner("Ann lives in Oslo .", ("Ann", "person"), ("Oslo", "location")), ner("Nothing here .")],
        "test": [ner("Bob met Ann .", ("Bob", "person"), ("Ann", "person"))],
    })
    write_dataset(tmp_path, "RE", "Rel", ["live in", "work for"], {
        "test": [rel("Ann lives in Oslo .", ("Ann", "live in", "Oslo"))],
    })
    # EE labels as a list of {"event_type", "role_list"}, and one argument without pos
    ev = event("Acme hired Ann .", "hire", "hired", ("Acme", "employer"), ("Ann", "employee"))
    del ev["arguments"][1]["pos"]
    write_dataset(tmp_path, "EE", "Ev", [{"event_type": "hire", "role_list": ["employer", "employee"]}], {
        "test": [{"sentence": "Acme hired Ann .", "events": [ev]}],
    })
    return tmp_path


def test_reads_layout_with_spaces_and_both_ee_label_forms(root, tmp_path):
    recs = load_records(root, "test")
    assert [(r.task, r.dataset) for r in recs] == [("NER", "My NER set"), ("RE", "Rel"), ("EE", "Ev")]
    ner_rec, re_rec, ee_rec = recs
    assert [(e.name, e.type, e.pos) for e in ner_rec.entities] == [("Bob", "person", (0, 3)), ("Ann", "person", (8, 11))]
    assert re_rec.relations[0].type == "live in" and re_rec.relations[0].tail.name == "Oslo"
    assert ee_rec.schema.roles == {"hire": ("employer", "employee")}
    assert ee_rec.events[0].arguments[1].pos is None  # pos is optional
    # EE labels as a dict {type: [roles]} give the same schema
    write_dataset(tmp_path / "other", "EE", "Ev", {"hire": ["employer", "employee"]}, {"test": [{"sentence": "x", "events": []}]})
    assert discover(tmp_path / "other")[0].schema.roles == {"hire": ("employer", "employee")}


def test_selection_and_cap(root):
    assert [r.dataset for r in load_records(root, "test", tasks=["RE", "EE"])] == ["Rel", "Ev"]
    assert [r.dataset for r in load_records(root, "test", datasets=["EE/Ev", "My NER set"])] == ["My NER set", "Ev"]
    train = load_records(root, "train", tasks=["NER"], max_records=1)
    assert len(train) == 1 and train[0].index == 0
    with pytest.raises(DataError, match="unknown data set 'Nope'.*available: NER/My NER set"):
        load_records(root, "test", datasets=["Nope"])
    with pytest.raises(DataError, match="does not exist"):
        load_records(root / "missing", "test")


BAD_CASES = {
    "invalid JSON": ('[{"sentence": "Ann .", "entities": []}, {"sentence": "Bob", "entities": [}]', "record 1: invalid JSON at line 1"),
    "missing field": (json.dumps([{"sentence": "Ann .", "entities": [{"type": "person", "pos": [0, 3]}]}]), "record 0: entity 0 has no 'name' field"),
    "pos outside": (json.dumps([{"sentence": "Ann .", "entities": [{"name": "Ann", "type": "person", "pos": [3, 9]}]}]), "record 0: entity 0 'pos' [3, 9] lies outside the sentence (length 5)"),
    "pos mismatch": (json.dumps([{"sentence": "Ann .", "entities": [{"name": "Ann", "type": "person", "pos": [1, 4]}]}]), "record 0: entity 0 'pos' [1, 4] covers 'nn ', not the name 'Ann'"),
    "label": (json.dumps([{"sentence": "Ann .", "entities": [{"name": "Ann", "type": "animal", "pos": [0, 3]}]}]), "record 0: entity 0 type 'animal' is not in labels.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_gives_one_line_and_exit_code_2(tmp_path, capsys, case):
    text, expected = BAD_CASES[case]
    folder = write_dataset(tmp_path, "NER", "Bad", ["person"], {})
    (folder / "test.json").write_text(text, encoding="utf-8")
    code = main(["render", "--data_dir", str(tmp_path), "--split", "test", "--format", "full", "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2
    first = err.splitlines()[0]
    assert first.startswith(f"error: {folder / 'test.json'}: ")
    assert expected in first
    assert "Traceback" not in err


def test_bad_records_in_re_and_ee(tmp_path):
    write_dataset(tmp_path, "RE", "R", ["work for"], {"test": [
        {"sentence": "Ann works .", "relations": [{"head": {"name": "Ann", "pos": [0, 3]}, "type": "kill", "tail": {"name": "x"}}]},
        {"sentence": "Ann works .", "relations": [{"head": {"name": "Ann"}, "type": "work for"}]},
    ]})
    write_dataset(tmp_path, "EE", "E", {"hire": ["employer"]}, {"test": [
        {"sentence": "Acme hired .", "events": [{"trigger": "hired", "type": "hire", "pos": [5, 10], "arguments": [{"name": "Acme", "role": "boss"}]}]},
    ]})
    with pytest.raises(DataError) as info:
        load_records(tmp_path, "test")
    lines = info.value.lines
    assert any("R/test.json: record 0: relation 0 type 'kill' is not in labels.json" in x for x in lines)
    assert any("R/test.json: record 1: relation 0 has no 'tail' field" in x for x in lines)
    assert any("E/test.json: record 0: event 0 argument 0 role 'boss' is not a role of 'hire' in labels.json" in x for x in lines)


def test_skip_policy_counts_problems_and_keeps_good_records(tmp_path, capsys):
    records = [
        {"sentence": "Ann .", "entities": [{"name": "Ann", "type": "person", "pos": [0, 3]}]},
        {"sentence": "Ann .", "entities": [{"name": "Ann", "type": "animal", "pos": [0, 3]}]},
        {"sentence": "Bob .", "entities": [{"name": "Bob", "type": "person", "pos": [1, 3]}]},
        {"sentence": "Cid .", "entities": [{"name": "Cid", "type": "person"}]},
    ]
    text = json.dumps(records)
    # break record 2's JSON; reading must resume at record 3
    text = text.replace('"Bob .", "entities"', '"Bob .", "entities" ', 1).replace('[{"name": "Bob"', '[{"name" "Bob"', 1)
    (write_dataset(tmp_path, "NER", "S", ["person"], {}) / "test.json").write_text(text, encoding="utf-8")
    report = LoadReport()
    recs = load_records(tmp_path, "test", on_error="skip", report=report)
    assert [r.index for r in recs] == [0, 3]
    assert report.skipped == {"label not in labels.json": 1, "invalid JSON": 1}
    code = main(["render", "--data_dir", str(tmp_path), "--format", "concise", "--on_error", "skip", "--out", str(tmp_path / "o.jsonl")])
    assert code == 0
    out = capsys.readouterr().out
    assert "skipped 2 records: 1 invalid JSON, 1 label not in labels.json" in out
    lines = (tmp_path / "o.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [0, 3]


def test_missing_labels_file_and_cli_process_exit_code(tmp_path):
    (tmp_path / "NER" / "NoLabels").mkdir(parents=True)
    (tmp_path / "NER" / "NoLabels" / "test.json").write_text("[]")
    proc = subprocess.run([sys.executable, "-m", "prouie_pl", "evaluate", "--data_dir", str(tmp_path), "--datasets", "NoLabels",
                           "--predictions", str(tmp_path / "p.jsonl")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "p.jsonl' does not exist" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "p.jsonl").write_text('{"task": "NER", "dataset": "NoLabels", "index": 0, "output": "{}"}\n')
    proc = subprocess.run([sys.executable, "-m", "prouie_pl", "evaluate", "--data_dir", str(tmp_path),
                           "--predictions", str(tmp_path / "p.jsonl")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[0] == f"error: {tmp_path / 'NER' / 'NoLabels' / 'labels.json'}: labels.json is missing; every data set folder needs one"
