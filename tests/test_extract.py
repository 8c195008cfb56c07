"""``python -m prouie_pl extract`` and the ``Extractor`` API on new text.

The tiny model is untrained, so a forward hook makes it write chosen answers (``ScriptedAnswers``): everything
after the logits (prompts, windows, batched ``generate``, parsing, alignment, merging, the files written) runs
the real code on what the model really generated.
"""

from __future__ import annotations

import io
import json
import random
import sys

import pytest
from test_constrained_decoding import ScriptedAnswers, window_text
from transformers import AutoModelForCausalLM, AutoTokenizer

from prouie_pl.cli import main
from prouie_pl.extraction_schema import as_schema
from prouie_pl.extractor import Extractor
from prouie_pl.text_windows import TokenCounter, pack_windows, split_sentences

SCHEMA = {"entities": ["person", "location"], "relations": ["live in"], "events": {"meet": ["agent", "place"]}}
FILLER = "The committee reviewed the annual budget report in detail. Council members discussed plans for roads and schools."


def task_of(prompt: str) -> str:
    first = prompt.split("\n", 2)[1] if prompt.startswith("user\n") else prompt.split("\n", 1)[0]
    return {"named": "NER", "relation": "RE", "event": "EE"}[first.split("Task: ", 1)[1].split()[0]]


def long_document() -> tuple[str, dict]:
    """About 10,000 characters of filler with names planted near the end; the offsets of what was planted."""
    rng = random.Random(0)
    parts = []
    while sum(map(len, parts)) < 9900:
        parts.append(rng.choice(FILLER.split(". ")).rstrip(".") + f" number {rng.randint(1, 99)}.")
    head = " ".join(parts) + "\n\n"
    tail = "Zebulon Quartermaine waved, and later that week Zebulon Quartermaine met Philippa Okonkwo-Reyes in Vladivostok."
    doc = head + tail
    first = doc.index("Zebulon Quartermaine")
    second = doc.index("Zebulon Quartermaine", first + 1)
    spots = {"zebulon1": first, "zebulon2": second, "philippa": doc.index("Philippa"), "vladivostok": doc.index("Vladivostok"),
             "met": doc.index(" met ") + 1}
    return doc, spots


def planted_answers(prompt: str, exact_only: bool = False) -> str:
    """What the scripted model answers: the planted names where the window has them, nothing elsewhere."""
    if "Zebulon" not in window_text(prompt):
        return "{}"
    task = task_of(prompt)
    if task == "NER":
        other = "Philippa Okonkwo-Reyes" if exact_only else "PHILIPPA  okonkwo-reyes; Bartholomew Nobody"
        return json.dumps({"person": f"Zebulon Quartermaine; Zebulon Quartermaine; {other}", "location": "Vladivostok"})
    if task == "RE":
        return json.dumps({"live in": "Zebulon Quartermaine -> Vladivostok"})
    return json.dumps({"meet": "met: Agent: Zebulon Quartermaine; Agent: Philippa Okonkwo-Reyes; Place: Vladivostok"})


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def scripted(lm):
    """Install a scripted answer function on the shared tiny model for one test."""
    model, tok = lm
    hooks = []

    def install(answer_for, target=None):
        hooks.append(ScriptedAnswers(target or model, tok, answer_for, tok.eos_token_id))
        return hooks[-1]

    yield install
    for h in hooks:
        h.remove()


def spans_of(result) -> list:
    out = [(e.text, e.type, e.start, e.end) for e in result.entities]
    for r in result.relations:
        out += [(r.head.text, "head", r.head.start, r.head.end), (r.tail.text, "tail", r.tail.start, r.tail.end)]
    for e in result.events:
        out.append((e.trigger.text, "trigger", e.trigger.start, e.trigger.end))
        out += [(a.text, a.role, a.start, a.end) for a in e.arguments]
    return out


# ------------------------------------------------------------------------------------------ sentences, windows


def test_sentence_splitter_rules():
    text = ("Dr. Smith met J. R. Ewing at 5 p.m. in the U.S. Then they left!  Was it late? yes, it was.\n"
            "A wrapped\nline continues here.\n\nNew paragraph without a stop\n\n東京に行った。大阪も")
    got = [text[a:b] for a, b in split_sentences(text)]
    assert got == ["Dr. Smith met J. R. Ewing at 5 p.m. in the U.S. Then they left!",
                   "Was it late? yes, it was.",
                   "A wrapped\nline continues here.",
                   "New paragraph without a stop",
                   "東京に行った。", "大阪も"]
    assert split_sentences("   \n\n  ") == []


def test_windows_fit_cover_the_text_in_order_and_cut_long_sentences(lm):
    model, tok = lm
    doc, _ = long_document()
    doc += " " + "word " * 900  # one sentence far longer than a window
    ex = Extractor(model, tok, max_input_tokens=256)
    windows = ex.windows(doc, SCHEMA)
    assert len(windows) > 10
    for a, b in zip(windows, windows[1:]):
        assert a.end <= b.start and not doc[a.end:b.start].strip()  # nothing but whitespace between windows
    assert doc[:windows[0].start].strip() == "" and doc[windows[-1].end:].strip() == ""
    for w in windows:
        assert w.text == doc[w.start:w.end]
        for task, schema in as_schema(SCHEMA).label_schemas().items():
            assert len(ex.prompt_ids(w.text, task, schema)) <= 256
    for text in (doc, "東京大阪" * 800):  # the second: no spaces, several byte tokens per character
        counter = TokenCounter(tok, text)
        windows = pack_windows(text, 50, counter)
        assert len(windows) > 10 and all(counter.count(w.start, w.end) <= 50 for w in windows)
        assert "".join("".join(w.text.split()) for w in windows) == "".join(text.split())  # all of it, in order


# ------------------------------------------------------------------------------------------ the Extractor


def test_long_document_spans_come_back_at_their_offsets(lm, scripted):
    model, tok = lm
    doc, spot = long_document()
    assert len(doc) >= 10_000
    scripted(planted_answers)
    ex = Extractor(model, tok, max_input_tokens=256, batch_size=8)
    windows = ex.windows(doc, SCHEMA)
    assert len(windows) > 5 and "Zebulon" in windows[-1].text and "Zebulon" not in doc[:windows[-1].start]
    result = ex.extract(doc, SCHEMA)
    assert result.chunks == len(windows)
    for text, _kind, start, end in spans_of(result):
        assert doc[start:end] == text
    z1, z2 = spot["zebulon1"], spot["zebulon2"]
    zl = len("Zebulon Quartermaine")
    assert [(e.type, e.start, e.end) for e in result.entities] == [
        ("person", z1, z1 + zl), ("person", z2, z2 + zl),
        ("person", spot["philippa"], spot["philippa"] + len("Philippa Okonkwo-Reyes")),  # found case- and space-insensitively
        ("location", spot["vladivostok"], spot["vladivostok"] + len("Vladivostok")),
    ]
    assert result.entities[2].text == "Philippa Okonkwo-Reyes"
    # the relation takes the mention of Zebulon next to Vladivostok; the event's arguments the ones next to "met"
    (rel,) = result.relations
    assert (rel.head.start, rel.tail.start) == (z2, spot["vladivostok"])
    (event,) = result.events
    assert (event.type, event.trigger.start) == ("meet", spot["met"])
    assert [(a.role, a.start) for a in event.arguments] == [("agent", z2), ("agent", spot["philippa"]), ("place", spot["vladivostok"])]
    assert [u.to_json() for u in result.unaligned] == [
        {"kind": "entity", "type": "person", "text": "Bartholomew Nobody", "reason": "not found in the text", "chunk": len(windows) - 1}]
    assert all(o.parsed_ok for o in result.outputs) and len(result.outputs) == 3 * len(windows)


def test_constrained_extraction_of_valid_answers_is_the_same(lm, scripted):
    model, tok = lm
    doc, _ = long_document()
    scripted(lambda p: planted_answers(p, exact_only=True))
    plain = Extractor(model, tok, max_input_tokens=256, batch_size=8).extract(doc, SCHEMA)
    constrained = Extractor(model, tok, max_input_tokens=256, batch_size=8, constrained=True).extract(doc, SCHEMA)
    assert constrained.to_json() == plain.to_json()
    assert len(plain.entities) == 4 and not plain.unaligned
    assert [o.output for o in constrained.outputs] == [o.output for o in plain.outputs]


def test_api_import_lists_and_documents_in_order(lm, scripted):
    import prouie_pl

    model, tok = lm
    assert prouie_pl.Extractor is Extractor
    scripted(lambda p: json.dumps({"person": window_text(p).split()[0]}) if task_of(p) == "NER" else "{}")
    ex = Extractor(model, tok, batch_size=2)
    texts = ["Ann sang.", "", "Bob  ran far away today.", "Cy"]
    results = ex.extract(texts, {"entities": ["person"]}, ids=["a", "b", "c", "d"])
    assert [r.id for r in results] == ["a", "b", "c", "d"]
    assert [[e.text for e in r.entities] for r in results] == [["Ann"], [], ["Bob"], ["Cy"]]
    assert results[1].chunks == 0 and results[1].to_json() == {
        "id": "b", "entities": [], "relations": [], "events": [], "unaligned": [], "chunks": 0, "truncated_answers": 0,
        "looped_answers": 0, "cut_windows": 0, "below_threshold": 0, "windows": []}
    single = ex.extract("Dee waved.", {"entities": ["person"]})
    # the scripted model puts all its mass on each token it writes: the unit's probability is 1
    assert single.entities[0].to_json() == {"text": "Dee", "type": "person", "start": 0, "end": 3, "score": 1.0}
    assert single.to_json()["windows"] == [{"start": 0, "end": 10, "sentence_cut": False, "truncated_tasks": []}]


def test_a_huge_document_is_extracted_whole(lm, scripted):
    model, tok = lm
    rng = random.Random(1)
    parts, n = [], 0
    while n < 1_000_000:
        s = rng.choice(FILLER.split(". ")).rstrip(".") + ". "
        parts.append(s)
        n += len(s)
    doc = "".join(parts) + "At last Zebulon Quartermaine arrived."
    scripted(lambda p: '{"person": "Zebulon Quartermaine"}' if "Zebulon" in p and task_of(p) == "NER" else "{}")
    result = Extractor(model, tok, max_input_tokens=1024, batch_size=32).extract(doc, {"entities": ["person"]})
    start = doc.index("Zebulon")
    assert [(e.start, e.end) for e in result.entities] == [(start, start + 20)]
    assert result.chunks > 300 and not result.unaligned


# ------------------------------------------------------------------------------------------ the command


@pytest.fixture
def command(lm, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Run ``python -m prouie_pl extract`` on the tiny model with scripted answers; returns (exit code, stderr)."""
    schema = tmp_path / "schema.yaml"
    schema.write_text("entities: [person, location]\nrelations: [live in]\n", encoding="utf-8")
    state = {"answer_for": lambda p: "{}", "loads": 0}
    original = Extractor.from_pretrained.__func__

    def loading(cls, *args, **kwargs):
        ex = original(cls, *args, **kwargs)
        state["loads"] += 1
        state["hook"] = ScriptedAnswers(ex.model, ex.tokenizer, lambda p: state["answer_for"](p), ex.tokenizer.eos_token_id)
        return ex

    monkeypatch.setattr(Extractor, "from_pretrained", classmethod(loading))

    def run(*args, answer_for=None, model=str(tiny_model_dir)):
        if answer_for is not None:
            state["answer_for"] = answer_for
        argv = ["extract", "--model", model, "--no_progress", "--batch_size", "2"]
        if "--schema" not in args and "--labels_from" not in args:
            argv += ["--schema", str(schema)]
        code = main(argv + [str(a) for a in args])
        return code, capsys.readouterr().err

    run.state = state
    return run


def first_word_is_a_person(prompt: str) -> str:
    text = window_text(prompt)
    return json.dumps({"person": text.split()[0]}) if task_of(prompt) == "NER" else "{}"


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_folder_jsonl_and_stdin_inputs(command, tmp_path, monkeypatch):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("Bea reads.", encoding="utf-8")
    (folder / "a.txt").write_text("Al writes.\n\nAl sleeps.", encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    out = tmp_path / "folder.jsonl"
    code, err = command("--input", folder, "--out", out, answer_for=first_word_is_a_person)
    assert code == 0, err
    got = lines(out)
    assert [d["id"] for d in got] == ["a", "b"]
    assert got[0]["entities"] == [{"text": "Al", "type": "person", "start": 0, "end": 2, "score": 1.0}] and got[0]["chunks"] == 1
    assert got[1]["entities"] == [{"text": "Bea", "type": "person", "start": 0, "end": 3, "score": 1.0}]
    assert set(got[0]) == {"id", "entities", "relations", "events", "unaligned", "chunks", "truncated_answers", "looped_answers", "cut_windows",
                           "below_threshold", "windows"}

    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"id": "x1", "text": "Cat naps."}) + "\n\n" + json.dumps({"text": "Dan ran."}) + "\n", encoding="utf-8")
    out2 = tmp_path / "jsonl.jsonl"
    assert command("--input", jsonl, "--out", out2)[0] == 0
    assert [(d["id"], [e["text"] for e in d["entities"]]) for d in lines(out2)] == [("x1", ["Cat"]), ("3", ["Dan"])]

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("Eve hums.".encode("utf-8"))))
    out3 = tmp_path / "stdin.jsonl"
    assert command("--input", "-", "--out", out3)[0] == 0
    assert lines(out3)[0]["id"] == "stdin" and lines(out3)[0]["entities"][0]["text"] == "Eve"


def test_resume_after_an_interruption_writes_each_document_once(command, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Name{i} waits here."}) + "\n" for i in range(6)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    schema = tmp_path / "people.yaml"
    schema.write_text("entities: [person]\n", encoding="utf-8")
    calls = {"n": 0}

    def interrupted(prompt):
        calls["n"] += 1
        if calls["n"] > 4:  # the third batch of two
            raise KeyboardInterrupt
        return first_word_is_a_person(prompt)

    code, err = command("--input", docs, "--out", out, "--schema", schema, answer_for=interrupted)
    assert code == 130 and "interrupted" in err
    before = lines(out)
    assert 1 <= len(before) < 6
    with out.open("a", encoding="utf-8") as fh:  # a line cut off mid-write
        fh.write('{"id": "d5", "entities": [{"te')
    code, err = command("--input", docs, "--out", out, "--schema", schema, "--resume", answer_for=first_word_is_a_person)
    assert code == 0, err
    assert f"{len(before)} already in" in err
    after = lines(out)
    assert after[:len(before)] == before
    assert sorted(d["id"] for d in after) == [f"d{i}" for i in range(6)]
    assert all(d["entities"][0]["text"] == f"Name{d['id'][1]}" for d in after)
    code, err = command("--input", docs, "--out", out, "--schema", schema)
    assert code == 2 and "--resume" in err and "--overwrite" in err


def test_an_adapter_folder_loads_with_its_base_from_adapter_config(command, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    doc = tmp_path / "doc.txt"
    doc.write_text("Fay Wong sings in Lima.", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    code, err = command("--input", doc, "--out", out, "--constrained", model=str(adapter), answer_for=first_word_is_a_person)
    assert code == 0, err
    assert lines(out)[0]["entities"] == [{"text": "Fay", "type": "person", "start": 0, "end": 3, "score": 1.0}]


def test_an_adapter_folder_brings_its_answer_format_and_export_keeps_it(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from prouie_pl.export import export_merged
    from prouie_pl.formats import ANSWER_FORMAT_FILE, write_answer_format

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(adapter)
    assert Extractor.from_pretrained(str(adapter), device="cpu").format == "concise"  # no record: the SA/DE format
    write_answer_format(adapter, "full")  # a CM adapter
    assert Extractor.from_pretrained(str(adapter), device="cpu").format == "full"
    assert Extractor.from_pretrained(str(adapter), device="cpu", target_format="keyed").format == "keyed"  # told wins
    merged = export_merged(str(adapter), str(tiny_model_dir), str(tmp_path / "merged"), dtype="float32")
    assert Extractor.from_pretrained(str(merged), device="cpu").format == "full"
    (adapter / ANSWER_FORMAT_FILE).write_text('{"format": "short"}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"answer_format\.json: 'format' must be one of full, concise, keyed, not 'short'"):
        Extractor.from_pretrained(str(adapter), device="cpu")
    (adapter / ANSWER_FORMAT_FILE).write_text("full", encoding="utf-8")
    with pytest.raises(ValueError, match=r"answer_format\.json: not a JSON object"):
        Extractor.from_pretrained(str(adapter), device="cpu")


def test_labels_from_a_data_set(command, demo_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("Gus Pike visited Quito.", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    code, err = command("--input", doc, "--out", out, "--labels_from", demo_dir / "NER" / "DemoNER",
                        answer_for=lambda p: '{"location": "Quito"}')
    assert code == 0, err
    assert lines(out)[0]["entities"] == [{"text": "Quito", "type": "location", "start": 17, "end": 22, "score": 1.0}]


@pytest.mark.parametrize("case", ["empty schema", "schema syntax", "schema shape", "missing input", "not utf-8", "bad jsonl",
                                  "empty folder", "missing model", "duplicate ids"])
def test_bad_input_is_one_line_naming_the_file(command, tmp_path, case):
    doc = tmp_path / "doc.txt"
    doc.write_text("Hal hops.", encoding="utf-8")
    args = ["--input", doc, "--out", tmp_path / "out.jsonl"]
    schema = tmp_path / "s.yaml"
    expect = str(schema)
    if case == "empty schema":
        schema.write_text("# nothing\n", encoding="utf-8")
        args += ["--schema", schema]
    elif case == "schema syntax":
        schema.write_text("entities: [person, location\nrelations: x\n", encoding="utf-8")
        args += ["--schema", schema]
        expect = f"{schema}: not valid YAML or JSON at line"
    elif case == "schema shape":
        schema.write_text("entity: [person]\n", encoding="utf-8")
        args += ["--schema", schema]
        expect = "unknown key(s) 'entity'"
    elif case == "missing input":
        args[1] = tmp_path / "nope.txt"
        expect = f"--input {tmp_path / 'nope.txt'} does not exist"
    elif case == "not utf-8":
        doc.write_bytes("Jos\u00e9 Mar\u00eda".encode("latin-1"))
        expect = f"{doc}: not UTF-8 text (byte 0xe9 at offset 3)"
    elif case == "bad jsonl":
        bad = tmp_path / "in.jsonl"
        bad.write_text('{"id": 1, "text": "ok"}\n{"id": 2, "text": 5}\n', encoding="utf-8")
        args[1] = bad
        expect = f'{bad}: line 2: needs an object with a string "text"'
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        args[1] = tmp_path / "empty"
        expect = "holds no .txt files"
    elif case == "missing model":
        code, err = command(*args, model=str(tmp_path / "no_such_adapter"))
        assert code == 2 and f"--model {tmp_path / 'no_such_adapter'} does not exist" in err
        return
    elif case == "duplicate ids":
        dup = tmp_path / "dup.jsonl"
        dup.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', encoding="utf-8")
        args[1] = dup
        expect = "document id 'a' appears twice"
    code, err = command(*args)
    assert code == 2
    assert expect in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert command.state["loads"] == 0  # bad input stops the run before the model loads


def test_empty_document_gives_an_empty_line(command, tmp_path):
    doc = tmp_path / "blank.txt"
    doc.write_text("  \n\n \t", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert command("--input", doc, "--out", out)[0] == 0
    assert lines(out) == [{"id": "blank", "entities": [], "relations": [], "events": [], "unaligned": [], "chunks": 0,
                           "truncated_answers": 0, "looped_answers": 0, "cut_windows": 0, "below_threshold": 0, "windows": []}]


# ------------------------------------------------------------------------------------------ scores, threshold, truncation


class DoubtfulAnswers(ScriptedAnswers):
    """Scripted answers where the first token of each word in ``doubt`` gets a rival token 1/3 as likely: the
    written token then has probability 3/4 (and stays the greedy choice)."""

    def __init__(self, model, tokenizer, answer_for, stop_id: int, doubt: tuple[str, ...]):
        self.doubt = doubt
        super().__init__(model, tokenizer, answer_for, stop_id)

    def _logits(self, prompts, step, logits):
        import math

        out = super()._logits(prompts, step, logits)
        if step == 0:
            self.doubt_steps = []
            for p in prompts:
                answer = self.answer_for(p)
                enc = self.tok(answer, add_special_tokens=False, return_offsets_mapping=True)
                starts = {answer.index(w) for w in self.doubt if w in answer}
                self.doubt_steps.append({t for t, (a, b) in enumerate(enc["offset_mapping"]) if any(a <= x < b for x in starts)})
        live = list(range(len(self.scripts))) if out.shape[0] == len(self.scripts) else [i for i, s in enumerate(self.scripts) if len(s) > step]
        for row, i in enumerate(live):
            if step in self.doubt_steps[i]:
                chosen = self.scripts[i][step]
                rival = 3 if chosen != 3 else 4
                out[row, rival] = 20.0 - math.log(3.0)
        return out


def test_units_carry_scores_and_the_threshold_drops_the_unsure_ones(lm):
    model, tok = lm
    answer = '{"person": "Ann; Bob"}'
    hook = DoubtfulAnswers(model, tok, lambda p: answer if task_of(p) == "NER" else "{}", tok.eos_token_id, ("Bob",))
    try:
        text = "Ann met Bob."
        doc = Extractor(model, tok, batch_size=2).extract(text, {"entities": ["person"]})
        scores = {e.text: e.score for e in doc.entities}
        assert scores["Ann"] == pytest.approx(1.0, abs=1e-4)
        assert scores["Bob"] == pytest.approx(0.75, abs=1e-3)
        sure = Extractor(model, tok, batch_size=2, threshold=0.8).extract(text, {"entities": ["person"]})
        assert [e.text for e in sure.entities] == ["Ann"] and sure.below_threshold == 1
        assert [e.text for e in Extractor(model, tok, batch_size=2, threshold=0.0).extract(text, {"entities": ["person"]}).entities] == ["Ann", "Bob"]
        assert not Extractor(model, tok, batch_size=2, threshold=1.0).extract(text, {"entities": ["person"]}).entities
        bare = Extractor(model, tok, batch_size=2, scores=False).extract(text, {"entities": ["person"]})
        assert [e.score for e in bare.entities] == [None, None] and "score" not in bare.entities[0].to_json()
        with pytest.raises(ValueError, match="threshold"):
            Extractor(model, tok, threshold=0.5, scores=False)
    finally:
        hook.remove()


def test_truncated_answers_and_cut_sentences_are_reported(lm, scripted):
    model, tok = lm
    scripted(lambda p: json.dumps({"person": "; ".join(["Zebulon Quartermaine"] * 30)}) if task_of(p) == "NER" else "{}")
    long_sentence = " ".join(["word"] * 300) + " Zebulon Quartermaine stayed."
    doc = Extractor(model, tok, max_input_tokens=160, max_new_tokens=24, batch_size=4).extract(long_sentence, {"entities": ["person"]})
    assert doc.chunks > 1
    # one sentence longer than a window: every window cuts it; every NER answer hit the 24-token cap
    assert doc.cut_windows == doc.chunks and all(w.sentence_cut for w in doc.windows)
    assert doc.truncated_answers == doc.chunks and all(w.truncated_tasks == ("NER",) for w in doc.windows)
    j = doc.to_json()
    assert j["cut_windows"] == doc.chunks and j["truncated_answers"] == doc.chunks
    short = Extractor(model, tok, max_input_tokens=160, max_new_tokens=24).extract("Ann ran. Bob sat.", {"entities": ["person"]})
    assert short.cut_windows == 0


def test_the_loop_guard_ends_a_repeating_answer_and_reports_it(lm, scripted):
    model, tok = lm
    scripted(lambda p: json.dumps({"person": "; ".join(["Zebulon Quartermaine"] * 40)}))
    guarded = Extractor(model, tok, max_new_tokens=120).extract("Ann ran.", {"entities": ["person"]})
    plain = Extractor(model, tok, max_new_tokens=120, loop_guard=False).extract("Ann ran.", {"entities": ["person"]})
    (g,), (p,) = guarded.outputs, plain.outputs
    assert (p.new_tokens, p.truncated, p.looped) == (120, True, False) and p.output.count("Zebulon") > 5
    # guarded: ended once the name had come three times in a row, two copies of the repeat kept
    assert g.truncated and g.looped and g.new_tokens < 70 and 2 <= g.output.count("Zebulon") <= 4
    assert p.output.startswith(g.output)
    assert (guarded.looped_answers, guarded.truncated_answers, plain.looped_answers) == (1, 1, 0)
    assert guarded.windows[0].truncated_tasks == () and plain.windows[0].truncated_tasks == ("NER",)
    assert guarded.to_json()["looped_answers"] == 1
