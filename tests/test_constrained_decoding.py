"""Schema-constrained decoding: every answer parses and copies its spans from the text, whatever the model prefers.

The tiny model is untrained, so its preferences are set by forward hooks on its logits: random logits, logits
that push keys outside the schema and names that are not in the text, logits that never want to close, and a
"model" that already writes the gold answer (where the constraint must change nothing).  The hooks change the
model's own output, so decoding runs the real ``generate`` path with the real processor.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prouie_pl.chat import chat_prompt_ids, stop_token_ids
from prouie_pl.constrained import RowAutomaton, grammar_for, token_byte_strings, token_table
from prouie_pl.datamodules.batching import collate_prompts
from prouie_pl.decoding import generate_greedy
from prouie_pl.formats import build_prompt, render_target
from prouie_pl.parser import parse_output
from prouie_pl.reader import load_records
from prouie_pl.schema import Argument, Entity, Event, LabelSchema, Record, Relation

NER = LabelSchema("NER", ("person", "location", "organization"))
RE = LabelSchema("RE", ("work for", "live in"))
EE = LabelSchema("EE", ("meet", "adverse event"), {"meet": ("agent", "place"), "adverse event": ("subject", "treatment", "effect")})
SCHEMAS = {"NER": NER, "RE": RE, "EE": EE}

# texts with every character the compact syntax cares about: quotes, ';', '->', ':', a backslash, a line break,
# non-ASCII letters, and one with nothing a span could start on
TEXTS = [
    'John Smith met Mary in Oslo; he said "hi" -> then left: ok.',
    "Ann Lee works for IBM in Zürich, Genève and Kraków.",
    "The patient developed a rash after taking aspirin: 50 mg daily\nfor a week \\ roughly.",
    "Vera Adams joined Helix Biotech -> Lisbon; Lisbon again.",
    '"";;;"',
]


class LogitsHook:
    """Replaces the model's next-token logits by ``fn(prompts, step, logits)`` (prompts decoded at prefill)."""

    def __init__(self, model, tokenizer, fn):
        self.tok, self.fn = tokenizer, fn
        self.prompts: list[str] = []
        self.step = 0
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, out):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:  # the prefill of a new generate call
            self.prompts = self.tok.batch_decode(ids, skip_special_tokens=True)
            self.step = 0
        out.logits[:, -1, :] = self.fn(self.prompts, self.step, out.logits[:, -1, :])
        self.step += 1
        return out

    def remove(self) -> None:
        self.handle.remove()


def window_text(prompt: str) -> str:
    """The text a decoded prompt asks about: after ``Text: ``, without the assistant header that follows it
    (``assistant`` in ChatML, ``model`` in Gemma's turn format)."""
    return re.sub(r"\n(assistant|model)\n?\Z", "", prompt.split("Text: ", 1)[1])


class ScriptedAnswers(LogitsHook):
    """A model that writes ``answer_for(prompt)`` token by token, then its stop token."""

    def __init__(self, model, tokenizer, answer_for, stop_id: int):
        self.answer_for, self.stop_id = answer_for, stop_id
        self.scripts: list[list[int]] = []
        super().__init__(model, tokenizer, self._logits)

    def _logits(self, prompts, step, logits):
        if step == 0:
            self.scripts = [self.tok(self.answer_for(p), add_special_tokens=False)["input_ids"] + [self.stop_id] for p in prompts]
        out = torch.full_like(logits, -20.0) + 0.01 * logits
        # the decoding loop drops a row once it has stopped (after the last token of its script); generate keeps it
        live = self.scripts if logits.shape[0] == len(self.scripts) else [s for s in self.scripts if len(s) > step]
        assert len(live) == logits.shape[0], (len(live), logits.shape)
        for i, script in enumerate(live):
            out[i, script[min(step, len(script) - 1)]] = 20.0
        return out


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, tok


def decode(model, tok, rows, constrained: bool, max_new_tokens: int = 80):
    """Greedy answers for ``(task, schema, text)`` rows, through the same prompt and decoding path as extraction."""
    prompts = [chat_prompt_ids(tok, build_prompt(Record(text, task, "", schema), "concise", schema)) for task, schema, text in rows]
    batch = collate_prompts(tok.pad_token_id)([(None, p) for p in prompts])
    stops = stop_token_ids(tok, model.generation_config)
    return generate_greedy(model, tok, batch["input_ids"], batch["attention_mask"], max_new_tokens, stops,
                           constraint_rows=rows if constrained else None)


def assert_valid(rows, out) -> int:
    """Every answer parses cleanly, ends before the limit, and every span is a substring of its row's text;
    returns how many units the answers hold."""
    units = 0
    for (task, schema, text), answer, cut in zip(rows, out.texts, out.truncated):
        parsed = parse_output(answer, task, schema)
        assert parsed.ok, (answer, parsed.problems)
        assert not cut, answer
        for u in parsed.units:
            for span in (u.text, u.head, u.tail):
                assert span.strip() in text, (span, text, answer)
        keys = list(json.loads(answer))
        assert len(keys) == len(set(keys)) and set(keys) <= set(schema.labels), answer
        units += len(parsed.units)
    return units


def all_rows():
    return [(task, SCHEMAS[task], text) for text in TEXTS for task in ("NER", "RE", "EE")]


# ------------------------------------------------------------------------------------------ token bytes


def test_token_bytes_concatenate_to_the_decoded_text(lm):
    model, tok = lm
    table = token_byte_strings(tok)
    special = set(tok.all_special_ids)
    assert all(table[i] is None for i in special)
    for text in TEXTS + ['{"person": "Zürich; Kraków", "x": "a -> b"}']:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(table[i] for i in ids).decode("utf-8") == tok.decode(ids, clean_up_tokenization_spaces=False) == text


# ------------------------------------------------------------------------------------------ the automaton


def test_every_rendered_demo_answer_is_accepted_token_by_token(lm, demo_dir):
    """The automaton accepts what the renderer writes, in the tokenisation the model would use, and ends it."""
    model, tok = lm
    table = token_table(tok)
    stops = stop_token_ids(tok, model.generation_config)
    handmade = [
        Record(TEXTS[0], "NER", "x", NER, entities=(Entity("John Smith", "person"), Entity("Mary", "person"), Entity("Oslo", "location"))),
        Record(TEXTS[3], "RE", "x", RE, relations=(Relation(Entity("Vera Adams"), "work for", Entity("Helix Biotech")),
                                                  Relation(Entity("Vera Adams"), "live in", Entity("Lisbon")))),
        Record(TEXTS[2], "EE", "x", EE, events=(Event("developed", "adverse event", arguments=(Argument("The patient", "subject"), Argument("a rash", "effect"), Argument("aspirin", "treatment"))),
                                               Event("taking", "adverse event"))),
    ]
    checked = 0
    for rec in load_records(demo_dir, "test") + handmade:
        answer = render_target(rec, "concise")
        row = RowAutomaton(grammar_for(rec.task, rec.schema), rec.sentence, table, stops)
        for tid in tok(answer, add_special_tokens=False)["input_ids"] + [stops[0]]:
            assert tid in set(row.allowed(False).tolist()), (answer, tok.decode([tid]))
            row.advance(tid)
        assert row.done and not row.free
        checked += 1
    assert checked == 123


def test_the_automaton_refuses_what_the_schema_or_text_does_not_have(lm):
    model, tok = lm
    table = token_table(tok)
    stops = stop_token_ids(tok, model.generation_config)

    def accepts(answer: str, text: str = TEXTS[0], schema=NER) -> bool:
        row = RowAutomaton(grammar_for(schema.task, schema), text, table, stops)
        for tid in tok(answer, add_special_tokens=False)["input_ids"]:
            if tid not in set(row.allowed(False).tolist()):
                return False
            row.advance(tid)
        return True

    assert accepts('{"person": "John Smith; Mary"}')
    assert not accepts('{"animal": "Mary"}')  # key outside the schema
    assert not accepts('{"person": "Bob"}')  # not in the text
    assert not accepts('{"person": "Mary", "person": "John"}')  # a key twice
    assert not accepts('{"person": " Mary"}')  # a span starting with a space
    assert not accepts('{"person": "hi\\""}')  # a quote inside a span
    assert accepts('{"person": "Oslo; he"}')  # both pieces are in the text
    assert not accepts('{"work for": "said \\"hi\\" -> left"}', schema=RE)
    assert accepts('{"work for": "John Smith -> Oslo"}', schema=RE)
    assert accepts('{"work for": "he said -> then -> x"}', text="he said -> then -> x", schema=RE)  # '->' in a tail reads back
    assert not accepts('{"work for": "a->b -> c"}', text="a->b -> c", schema=RE)  # '->' in a head would not
    assert accepts('{"meet": "met: Agent: John Smith; Place: Oslo"}', schema=EE)
    assert not accepts('{"meet": "met: Effect: Oslo"}', schema=EE)  # a role of another event type
    assert not accepts('{"meet": "left: ok: Agent: Mary"}', schema=EE)  # ':' inside a trigger


# ------------------------------------------------------------------------------------------ decoding


def test_random_logits_give_answers_that_parse_and_copy_the_text(lm):
    model, tok = lm
    rows = all_rows()
    units = 0
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        hook = LogitsHook(model, tok, lambda prompts, step, logits: 4.0 * torch.randn(logits.shape, generator=gen))
        try:
            constrained = decode(model, tok, rows, constrained=True)
            unconstrained = decode(model, tok, rows, constrained=False)
        finally:
            hook.remove()
        units += assert_valid(rows, constrained)
        assert sum(parse_output(a, t, s).ok for (t, s, _), a in zip(rows, unconstrained.texts)) < 3
        # the text with nothing a span can start on admits only the empty answer
        assert all(a == "{}" for (_, _, text), a in zip(rows, constrained.texts) if text == '"";;;"')
    assert units > 10  # the constraint did not just close every answer at once


def test_a_model_that_wants_other_keys_and_other_names_still_answers_from_the_schema_and_text(lm):
    model, tok = lm
    rows = all_rows()
    wanted = {"NER": '{"organisation": "Zyxw Qvpl; Bob Bobson"}', "RE": '{"kill": "Bob -> Qvpl", "work for": "Bob -> IBM"}',
              "EE": '{"attack": "bombed: Victim: Bob", "meet": "met: Agent: Bob"}'}
    task_of = {"named": "NER", "relation": "RE", "event": "EE"}
    stop = stop_token_ids(tok, model.generation_config)[0]
    hook = ScriptedAnswers(model, tok, lambda p: wanted[task_of[p.split("Task: ", 1)[1].split()[0]]], stop)
    try:
        out = decode(model, tok, rows, constrained=True)
        free = decode(model, tok, rows, constrained=False)
    finally:
        hook.remove()
    assert free.texts == [wanted[task] for task, _, _ in rows]  # left alone, the model writes what it wants
    assert assert_valid(rows, out) > 0
    assert not any(w in a for a in out.texts for w in ("organisation", "kill", "attack", "Bob", "Qvpl"))


def test_a_model_that_never_wants_to_stop_is_closed_within_the_token_limit(lm):
    model, tok = lm
    rows = all_rows()
    vocab = tok.get_vocab()
    ends = [i for t, i in vocab.items() if any(c in t for c in '}]"')] + [tok.eos_token_id]
    gen = torch.Generator().manual_seed(2)

    def endless(prompts, step, logits):
        out = torch.randn(logits.shape, generator=gen)
        out[:, ends] = -50.0
        return out

    hook = LogitsHook(model, tok, endless)
    try:
        out = decode(model, tok, rows, constrained=True, max_new_tokens=40)
    finally:
        hook.remove()
    assert_valid(rows, out)
    # every answer that could hold a span ran close to the limit before it was closed
    assert all(30 <= n <= 40 for (_, _, text), n in zip(rows, out.new_tokens) if text != '"";;;"'), out.new_tokens


def test_a_model_that_already_writes_valid_answers_is_not_changed(lm, demo_dir):
    model, tok = lm
    records = load_records(demo_dir, "test", max_records=8)
    by_text = {r.sentence: r for r in records}
    rows = [(r.task, r.schema, r.sentence) for r in records]
    stop = stop_token_ids(tok, model.generation_config)[0]
    hook = ScriptedAnswers(model, tok, lambda p: render_target(by_text[window_text(p)], "concise"), stop)
    try:
        constrained = decode(model, tok, rows, constrained=True, max_new_tokens=120)
        unconstrained = decode(model, tok, rows, constrained=False, max_new_tokens=120)
    finally:
        hook.remove()
    assert constrained.texts == unconstrained.texts == [render_target(r, "concise") for r in records]
    assert constrained.new_tokens == unconstrained.new_tokens


def test_uie_module_decodes_constrained_when_generation_settings_say_so(tiny_model_dir, demo_dir):
    from prouie_pl.modeling import BaseModelSettings
    from prouie_pl.uie_module import GenerationSettings, UIEModule

    module = UIEModule(base=BaseModelSettings(name_or_path=str(tiny_model_dir)), lora=None,
                       generation=GenerationSettings(max_new_tokens=48, constrained=True))
    module.configure_model()
    records = load_records(demo_dir, "test", max_records=3)
    tok = module.tokenizer
    batch = collate_prompts(tok.pad_token_id)([(r, chat_prompt_ids(tok, build_prompt(r, "concise"))) for r in records])
    gen = torch.Generator().manual_seed(3)
    inner = module.model.get_base_model() if hasattr(module.model, "get_base_model") else module.model
    hook = LogitsHook(inner, tok, lambda prompts, step, logits: 4.0 * torch.randn(logits.shape, generator=gen))
    try:
        step = module.predict_step(batch, 0)
        with pytest.raises(ValueError, match="needs the batch's records"):
            module.generate_texts(batch["input_ids"], batch["attention_mask"])
    finally:
        hook.remove()
    rows = [(r.task, r.schema, r.sentence) for r in records]
    from prouie_pl.decoding import GreedyOutput

    assert_valid(rows, GreedyOutput(step["outputs"], step["truncated"], [0] * len(rows)))
    assert step["records"] == records


def test_random_schemas_and_texts(lm):
    """Property check over random label sets and texts made of awkward characters."""
    model, tok = lm
    rng = random.Random(7)
    alphabet = list("abcAB ;:->\"\\é\n,.") + ["Oslo", "Mary", " -> ", ": "]
    rows = []
    for i in range(12):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 40)))
        task = ("NER", "RE", "EE")[i % 3]
        labels = tuple(dict.fromkeys(rng.choice(["a", "ab", "abc", "b c", "x\"y", "é"]) for _ in range(3)))
        roles = {lab: tuple(dict.fromkeys(rng.choice(["r", "role", "ro le"]) for _ in range(2))) for lab in labels} if task == "EE" else {}
        rows.append((task, LabelSchema(task, labels, roles), text))
    gen = torch.Generator().manual_seed(4)
    hook = LogitsHook(model, tok, lambda prompts, step, logits: 5.0 * torch.randn(logits.shape, generator=gen))
    try:
        out = decode(model, tok, rows, constrained=True, max_new_tokens=40)
    finally:
        hook.remove()
    assert_valid(rows, out)
