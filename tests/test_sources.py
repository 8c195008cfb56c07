"""Data through 🤗 datasets: BIO / CoNLL files, token + tag data sets, record files, tokenised once and cached."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import needs_shared_data
from helpers import ner
from training_helpers import QUIET_TRAINER, single_thread, stage_config
from prouie_pl.bio import TagError, bio_record, label_from_tag, record_to_bio, spans_to_tags, tags_to_spans
from prouie_pl.reader import DataError, LoadReport, load_records, write_dataset
from prouie_pl.sources import SourceSpec, load_rows, resolve_sources, rows_to_records

CONLL = """-DOCSTART- -X- -X- O

Ann NNP B-NP B-PER
Smith NNP I-NP I-PER
lives VBZ B-VP O
in IN B-PP O
New NNP B-NP B-LOC
York NNP I-NP I-LOC
. . O O

Bob NNP B-NP B-PER
met VBD B-VP O
Acme NNP B-NP B-ORG
. . O O
"""


# ------------------------------------------------------------------ tag schemes


@pytest.mark.parametrize("scheme,tags", [
    ("BIO", ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]),
    ("IOB2", ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]),
    ("BIOES", ["B-PER", "E-PER", "O", "S-LOC", "B-LOC", "E-LOC"]),
    ("BILOU", ["B-PER", "L-PER", "O", "U-LOC", "B-LOC", "L-LOC"]),
])
def test_schemes_give_the_same_spans(scheme, tags):
    assert tags_to_spans(tags, scheme) == [(0, 2, "PER"), (3, 4, "LOC"), (4, 6, "LOC")]


def test_io_merges_runs_and_lenient_bio_reads_iob1():
    assert tags_to_spans(["I-PER", "I-PER", "O", "LOC", "I-ORG"], "IO") == [(0, 2, "PER"), (3, 4, "LOC"), (4, 5, "ORG")]
    assert tags_to_spans(["I-PER", "I-PER", "O", "I-LOC", "I-ORG"], "BIO", strict=False) == [(0, 2, "PER"), (3, 4, "LOC"), (4, 5, "ORG")]


@pytest.mark.parametrize("tags,scheme,message", [
    (["O", "I-PER"], "BIO", "token 1: tag 'I-PER' follows 'O' (strict BIO: an entity starts with B-PER)"),
    (["B-PER", "I-LOC"], "BIO", "token 1: tag 'I-LOC' follows 'B-PER'"),
    (["B-PER", "X-PER"], "BIO", "token 1: unknown tag 'X-PER' for the BIO scheme"),
    (["S-PER"], "BIO", "token 0: unknown tag 'S-PER' for the BIO scheme"),
    (["B-"], "BIO", "token 0: unknown tag 'B-'"),
    (["B-PER", "O"], "BIOES", "token 1: O while the PER entity from token 0 is not closed by E- (strict BIOES)"),
    (["B-PER", "I-PER"], "BIOES", "token 2: the sentence ends while the PER entity from token 0 is not closed"),
])
def test_bad_tags_name_the_token(tags, scheme, message):
    with pytest.raises(TagError) as exc:
        tags_to_spans(tags, scheme)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_labels_from_tag_types():
    assert [label_from_tag(t) for t in ("PER", "ORG", "LOC", "MISC", "Work_For", "creative-work", "Disease")] == [
        "person", "organization", "location", "miscellaneous", "work for", "creative work", "disease"]
    assert label_from_tag("PER", {"PER": "human"}) == "human"


def test_bio_record_offsets_and_back():
    rec = bio_record(["Ann", "Smith", "lives", "in", "New", "York"], ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC"])
    assert rec == {"sentence": "Ann Smith lives in New York", "entities": [
        {"name": "Ann Smith", "type": "person", "pos": [0, 9]}, {"name": "New York", "type": "location", "pos": [19, 27]}]}
    tokens, tags = record_to_bio(rec["sentence"], rec["entities"], "BIOES")
    assert tags == ["B-person", "E-person", "O", "O", "B-location", "E-location"]
    with pytest.raises(TagError, match="3 tokens but 2 tags"):
        bio_record(["a", "b", "c"], ["O", "O"])
    with pytest.raises(TagError, match="overlaps another entity"):
        spans_to_tags(3, [(0, 2, "a"), (1, 3, "b")])
    with pytest.raises(TagError, match="does not start and end on token boundaries"):
        record_to_bio("Ann Smith", [{"name": "Smi", "type": "person", "pos": [4, 7]}])


@needs_shared_data
def test_bio_round_trips_every_shared_ner_data_set(shared_data):
    """entities -> BIO (and BIOES) -> entities gives the same entities, on every split of every NER data set;
    what one tag per token cannot hold (overlapping entities) is counted, and there is none in these sets."""
    from prouie_pl.reader import discover

    sets = discover(shared_data, tasks=["NER"])
    assert len(sets) == 10
    checked, unrepresentable = Counter(), Counter()
    for info in sets:
        label_map = {label.replace(" ", "_"): label for label in info.schema.labels}
        for split in ("train", "dev", "test"):
            for rec in load_records(shared_data, split, datasets=[info.id]):
                gold = sorted((e.name, e.type, e.pos) for e in rec.entities)
                for scheme in ("BIO", "BIOES"):
                    try:
                        tokens, tags = record_to_bio(rec.sentence, rec.entities, scheme)
                    except TagError:
                        unrepresentable[info.name] += 1
                        continue
                    back = bio_record(tokens, tags, scheme, strict=True, label_map=label_map)
                    assert back["sentence"] == rec.sentence
                    assert sorted((e["name"], e["type"], tuple(e["pos"])) for e in back["entities"]) == gold, (info.id, split, rec.index)
                    checked[scheme] += 1
    assert checked["BIO"] == checked["BIOES"] > 60_000
    assert not unrepresentable, unrepresentable


# ------------------------------------------------------------------ sources


def write_conll(path: Path, text: str = CONLL) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_conll_file_source_reads_sentences_and_labels(tmp_path):
    f = write_conll(tmp_path / "train.conll")
    (s,) = resolve_sources([{"format": "bio", "path": str(f), "name": "Mine"}], str(tmp_path / "cache"))
    assert (s.id, s.schema.labels) == ("NER/Mine", ("location", "organization", "person"))
    ((_, rows),) = load_rows([s], "train")
    recs = rows_to_records(rows, {("NER", "Mine"): s.schema}, "train")
    assert [r.sentence for r in recs] == ["Ann Smith lives in New York .", "Bob met Acme ."]
    assert [(e.name, e.type, e.pos) for e in recs[0].entities] == [("Ann Smith", "person", (0, 9)), ("New York", "location", (19, 27))]
    assert recs[1].index == 1


@pytest.mark.parametrize("text,message", [
    ("Ann B-PER\nSmith I-PER\n\nlives O\nin I-LOC\n", "train.conll: sentence 1 (line 4): token 1: tag 'I-LOC' follows 'O'"),
    ("Ann B-PER\nSmith Q-PER\n", "train.conll: sentence 0 (line 1): token 1: unknown tag 'Q-PER' for the BIO scheme"),
    ("Ann B-PER\nSmith\n", "train.conll: line 2: 'Smith' has 1 column(s)"),
])
def test_bad_bio_gives_one_line_per_sentence(tmp_path, text, message):
    f = write_conll(tmp_path / "train.conll", text)
    sets = resolve_sources([SourceSpec("bio", str(f), labels=["person", "location"])], str(tmp_path / "cache"))
    with pytest.raises(DataError) as exc:
        load_rows(sets, "train")
    assert message in exc.value.lines[0] and len(exc.value.lines) == 1
    report = LoadReport()
    ((_, rows),) = load_rows(sets, "train", on_error="skip", report=report)
    assert sum(report.skipped.values()) == 1 and message in report.lines[0]


def token_tag_dataset(tmp_path: Path):
    """A DatasetDict with tokens and ClassLabel tags, saved with save_to_disk (the same loader reads a hub id)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    features = Features({"id": Value("string"), "words": List(Value("string")), "ner_tags": List(ClassLabel(names=names))})
    rows = {"id": ["0", "1", "2"], "words": [["Ann", "visited", "Oslo"], ["Bob", "Lee", "slept"], ["Rome", "is", "old"]],
            "ner_tags": [[1, 0, 3], [1, 2, 0], [3, 0, 0]]}
    dd = DatasetDict({split: Dataset.from_dict(rows, features=features) for split in ("train", "validation", "test")})
    dd.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def test_token_tag_dataset_from_disk_names_labels_and_splits(tmp_path):
    saved = token_tag_dataset(tmp_path)
    spec = {"format": "bio", "path": str(saved), "name": "Toy", "columns": {"tokens": "words", "tags": "ner_tags"}}
    (s,) = resolve_sources([spec], str(tmp_path / "cache"))
    assert s.schema.labels == ("location", "person")  # from the ClassLabel names
    ((_, dev),) = load_rows([s], "dev")  # "dev" is the data set's "validation"
    recs = rows_to_records(dev, {("NER", "Toy"): s.schema}, "dev")
    assert [[(e.name, e.type) for e in r.entities] for r in recs] == [[("Ann", "person"), ("Oslo", "location")],
                                                                      [("Bob Lee", "person")], [("Rome", "location")]]
    bad = {**spec, "columns": {"tokens": "words", "tags": "missing"}}
    with pytest.raises(DataError, match="no column 'missing' \\(it has id, words, ner_tags\\); map ours to yours with columns"):
        resolve_sources([bad], str(tmp_path / "cache"))


def test_records_file_source_maps_columns_and_reports_rows(tmp_path):
    rows = [{"text": "Ann lives in Oslo .", "ents": [{"name": "Ann", "type": "person", "pos": [0, 3]}]},
            {"text": "Bob .", "ents": [{"name": "Bob", "type": "person", "pos": [1, 4]}]}]
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    spec = SourceSpec("records", str(f), task="NER", name="J", columns={"sentence": "text", "entities": "ents"})
    sets = resolve_sources([spec], str(tmp_path / "cache"))
    assert sets[0].schema.labels == ("person",)
    with pytest.raises(DataError) as exc:
        load_rows(sets, "train")
    assert exc.value.lines == [f"{f} (train split): row 1: entity 0 'pos' [1, 4] covers 'ob ', not the name 'Bob'"]
    ((_, good),) = load_rows(sets, "train", on_error="skip", report=LoadReport())
    assert len(good) == 1


def test_uie_folder_rows_match_the_reader_and_cap_counts_good_records(tmp_path):
    write_dataset(tmp_path / "d", "NER", "N", ["person"], {"train": [ner("Ann .", ("Ann", "person")), {"sentence": 3},
                                                                    ner("Bob .", ("Bob", "person")), {"sentence": 4}]})
    sets = resolve_sources([SourceSpec("uie", str(tmp_path / "d"))], str(tmp_path / "cache"))
    with pytest.raises(DataError) as new:
        load_rows(sets, "train")
    with pytest.raises(DataError) as old:
        load_records(tmp_path / "d", "train")
    assert new.value.lines == old.value.lines and len(new.value.lines) == 2
    with pytest.raises(DataError) as capped:
        load_rows(sets, "train", cap=2)  # the second good record comes before the second bad one
    assert capped.value.lines == old.value.lines[:1]
    ((_, rows),) = load_rows(sets, "train", cap=1)
    assert rows["index"] == [0]


# ------------------------------------------------------------------ tokenised once


def test_training_examples_equal_the_in_memory_encoding_and_are_cached(tiny_model_dir, demo_dir, tmp_path, monkeypatch):
    import prouie_pl.datamodules.tokenized as tokenized
    from prouie_pl.datamodules import UIEDataModule
    from prouie_pl.datamodules.batching import encode_sft
    from prouie_pl.formats import example
    from prouie_pl.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    calls = Counter()
    real = tokenized.example
    monkeypatch.setattr(tokenized, "example", lambda *a, **k: calls.update(["x"]) or real(*a, **k))

    def examples():
        dm = UIEDataModule(data_dir=str(demo_dir), stage="cm", cache_dir=str(tmp_path / "cache"), max_train_records=20, max_seq_length=160)
        dm.connect(tok)
        dm.setup("fit")
        ds = dm._sft_dataset(list(range(len(dm.train_records))), 0)
        return dm, [ds[i] for i in range(len(ds))]

    dm, first = examples()
    assert calls["x"] == len(dm.train_records) == 60
    expected = [encode_sft(tok, *example(r, "full"), 160) for r in dm.train_records]
    assert [(e.input_ids, e.labels, e.truncated) for e in first] == [(e.input_ids, e.labels, e.truncated) for e in expected if e]
    calls.clear()
    _, second = examples()  # a second start: rows and token ids come from the Arrow cache
    assert calls["x"] == 0 and [e.input_ids for e in second] == [e.input_ids for e in first]


def test_bio_file_and_saved_dataset_train_and_test_the_tiny_model(tiny_model_dir, tmp_path):
    """A CoNLL file and a save_to_disk token/tag data set as two sources: fit a few steps, then test scores both."""
    from prouie_pl.lightning_cli import build_cli

    conll_dir = tmp_path / "conll"
    conll_dir.mkdir()
    for split in ("train", "dev", "test"):
        write_conll(conll_dir / f"{split}.conll")
    saved = token_tag_dataset(tmp_path)
    sources = [{"format": "bio", "path": str(conll_dir), "name": "Conll",
                "splits": {"train": "train.conll", "dev": "dev.conll", "test": "test.conll"}},
               {"format": "bio", "path": str(saved), "name": "Toy", "columns": {"tokens": "words", "tags": "ner_tags"}}]
    cfg = stage_config("cm", tmp_path / "cm.yaml", **{
        "trainer.default_root_dir": str(tmp_path / "run"), "trainer.max_epochs": 1, "trainer.max_steps": 3,
        "trainer.callbacks": [{"class_path": "prouie_pl.callbacks.GenerationEvaluator", "init_args": {"sample_rows": 0}}],
        "trainer.limit_val_batches": 0, "trainer.enable_checkpointing": False, **QUIET_TRAINER,
        "model.init_args.base.name_or_path": str(tiny_model_dir), "model.init_args.generation.max_new_tokens": 8,
        "data.data_dir": None, "data.sources": sources, "data.cache_dir": str(tmp_path / "cache"), "data.batch_size": 2,
        "data.schedule": "mixed", "data.epochs_per_phase": 1})
    with single_thread():
        cli = build_cli(["--config", str(cfg)], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        assert cli.trainer.global_step == 3
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
    evaluator = next(c for c in cli.trainer.callbacks if type(c).__name__ == "GenerationEvaluator")
    report = evaluator.last_report
    assert report["n"] == 5
    assert set(report["tasks"]["NER"]["datasets"]) == {"Conll", "Toy"}
    assert all(0.0 <= v["f1"] <= 100.0 for v in report["tasks"]["NER"]["datasets"].values())
