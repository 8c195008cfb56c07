"""The bundled real demo data (``data_dir: demo_real``): it reads under the strict reader with nothing skipped,
the data module loads it by name, LICENSES.md covers every data set, every record survives both target formats
and scores 100 against itself, and the shipped files are exactly what ``python -m prouie_pl.demo_data.real``
writes from the shared data with the default seed."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import SHARED_DATA, needs_shared_data
from prouie_pl.demo_data import DEFAULT_SEED, real_demo_data_dir
from prouie_pl.demo_data.real import SPLITS, SUBSETS, main
from prouie_pl.formats import FORMATS, render_target
from prouie_pl.parser import parse_output, units_to_structures
from prouie_pl.reader import LoadReport, discover, load_records
from prouie_pl.schema import record_units
from prouie_pl.scoring import MODES, Scorer

REAL = real_demo_data_dir()
SIZES = {  # only 102 of CrossNER_politics' 200 training sentences have at most 40 words
    "NER/CrossNER_politics": {"train": 102, "dev": 40, "test": 100},
    "RE/SemEval2010-Task8": {"train": 300, "dev": 40, "test": 100},
    "EE/PHEE": {"train": 300, "dev": 40, "test": 100},
}


def shipped_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def records() -> dict[str, list]:
    """Every split, read strictly: a single bad record anywhere raises."""
    out = {}
    for split in SPLITS:
        report = LoadReport()
        out[split] = load_records(REAL, split, on_error="error", report=report)
        assert not report.skipped, report.summary()
    return out


def test_the_folder_holds_the_three_data_sets_and_nothing_else():
    assert [d.id for d in discover(REAL)] == ["NER/CrossNER_politics", "RE/SemEval2010-Task8", "EE/PHEE"]
    assert [s.folder for s in SUBSETS] == list(SIZES)
    expected = {"LICENSES.md"} | {f"{ds}/{name}.json" for ds in SIZES for name in ("labels", *SPLITS)}
    assert set(shipped_files(REAL)) == expected


def test_every_record_of_every_split_is_read_and_the_sizes_are_as_documented(records):
    for split, recs in records.items():
        assert Counter(f"{r.task}/{r.dataset}" for r in recs) == {ds: n[split] for ds, n in SIZES.items()}
        for ds, n in SIZES.items():  # strict reading kept every record of the file
            assert len(json.loads((REAL / ds / f"{split}.json").read_text(encoding="utf-8"))) == n[split]


def test_ner_sentences_are_capped_and_re_keeps_sentences_without_a_relation(records):
    for split, recs in records.items():
        ner = [r for r in recs if r.task == "NER"]
        assert max(len(r.sentence.split()) for r in ner) <= 40
        rel = [r for r in recs if r.task == "RE"]
        assert all(e.type == "" for r in rel for x in r.relations for e in (x.head, x.tail))
        assert 0 < sum(1 for r in rel if not r.relations) < len(rel), split
        assert {ev.type for r in recs if r.task == "EE" for ev in r.events} == {"adverse event", "potential therapeutic event"}


def test_the_data_module_loads_demo_real_by_name():
    from prouie_pl.datamodules import UIEDataModule, resolve_data_dir

    assert resolve_data_dir("demo_real") == REAL
    assert resolve_data_dir("demo") == REAL.parent
    dm = UIEDataModule(data_dir="demo_real", stage="cm", max_val_records=None)
    dm.setup("fit")
    dm.setup("test")
    assert Counter(r.dataset for r in dm.train_records) == {ds.split("/")[1]: n["train"] for ds, n in SIZES.items()}
    assert [p.name for p in dm.curriculum.phases] == ["NER", "RE", "EE"]
    assert len(dm.val_records) == 120 and len(dm.test_records) == 300
    assert not dm.load_report.skipped


def test_the_package_data_globs_ship_every_file():
    import glob
    import tomllib

    package = REAL.parents[1]
    globs = tomllib.loads((package.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["prouie_pl"]
    matched = {Path(f) for g in globs for f in glob.glob(g, root_dir=package, recursive=True)}
    assert {Path("demo_data/real") / name for name in shipped_files(REAL)} <= matched


def test_licenses_name_every_data_set_with_its_licence_source_and_citation():
    text = (REAL / "LICENSES.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| ((?:NER|RE|EE)/\S+) \| ([^|]+?) \| (\d+) \| (\d+) \| (\d+) \|$", text, flags=re.M)
    assert [r[0] for r in rows] == list(SIZES)
    for folder, licence, *counts in rows:
        assert licence in ("MIT", "CC BY 3.0"), (folder, licence)
        assert [int(c) for c in counts] == [SIZES[folder][s] for s in SPLITS]
        section = text.split(f"\n## {folder}\n", 1)[1].split("\n## ", 1)[0]
        assert f"- Licence: {licence} (" in section
        assert re.search(r"^- Source: \S+/\S+ @[0-9a-f]{7} : ", section, flags=re.M), folder
        assert re.search(r"^- Cite: .+\. (19|20)\d\d\. ", section, flags=re.M), folder
        if licence == "MIT":  # MIT asks for its notice to travel with the copies
            assert "Permission is hereby granted" in section and "Copyright (c)" in section


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_record_survives_render_then_parse(records, fmt):
    failures = []
    for split, recs in records.items():
        for rec in recs:
            res = parse_output(render_target(rec, fmt), rec.task, rec.schema)
            if not res.ok or units_to_structures(res.units) != units_to_structures(record_units(rec)):
                failures.append((rec.dataset, split, rec.index, res.problems))
    assert not failures, failures[:5]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gold_scored_against_itself_is_100_on_every_metric(records, fmt, mode):
    scorer = Scorer(mode)
    for rec in records["test"]:
        scorer.add(rec, render_target(rec, fmt))
    tasks = scorer.report()["tasks"]
    assert sorted(tasks) == ["EE_argument", "EE_trigger", "NER", "RE_boundary", "RE_strict"]
    for metric, entry in tasks.items():
        (ds, v), = entry["datasets"].items()
        assert v["f1"] == 100.0 and v["parse_failures"] == 0 and v["tp"] > 0, (metric, ds, v)
        assert v["n"] == SIZES[next(d for d in SIZES if d.endswith("/" + ds))]["test"]


def test_a_missing_source_names_the_file_and_the_flag(tmp_path):
    with pytest.raises(SystemExit, match=r"nowhere/NER/CrossNER_politics/labels\.json: not found; --src must be"):
        main(["--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])


@needs_shared_data
def test_shipped_files_are_what_the_script_writes_with_the_default_seed(tmp_path):
    assert main(["--src", str(SHARED_DATA), "--out", str(tmp_path)]) == 0
    made, shipped = shipped_files(tmp_path), shipped_files(REAL)
    assert sorted(made) == sorted(shipped)
    assert [name for name in made if made[name] != shipped[name]] == []


@needs_shared_data
def test_another_seed_draws_other_records_of_the_same_sizes(tmp_path):
    assert main(["--src", str(SHARED_DATA), "--out", str(tmp_path), "--seed", str(DEFAULT_SEED + 1)]) == 0
    for ds, sizes in SIZES.items():
        assert (tmp_path / ds / "labels.json").read_bytes() == (REAL / ds / "labels.json").read_bytes()
        for split in ("dev", "test"):
            other = json.loads((tmp_path / ds / f"{split}.json").read_text(encoding="utf-8"))
            ours = json.loads((REAL / ds / f"{split}.json").read_text(encoding="utf-8"))
            assert len(other) == sizes[split] and other != ours, (ds, split)
    assert f"with seed {DEFAULT_SEED + 1}." in (tmp_path / "LICENSES.md").read_text(encoding="utf-8")
