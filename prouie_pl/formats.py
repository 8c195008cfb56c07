"""Prompts and target formats.

Two target formats, both JSON objects keyed by label:

* ``full`` (Complete Modeling): every label of the schema is present, empty ones as ``[]``.
  NER ``{"person": ["John"], "location": []}``; RE ``{"work for": [{"head": "John", "tail": "IBM"}], ...}``;
  EE ``{"attack": [{"trigger": "bombed", "arguments": {"attacker": ["rebels"], "target": []}}], ...}``
  (every role of the event's type listed).
* ``concise`` (Streamlined Alignment and Deep Exploration): only labels with something to say, values joined
  into compact strings.  NER ``{"person": "John; Mary"}``; RE ``{"work for": "John -> IBM; Mary -> Google"}``;
  EE ``{"adverse event": "developed: Subject: patient; Effect: a hemorrhagic lesion"}`` (several events of
  one type become a list of such strings).  A value that the compact syntax cannot carry unambiguously (a name
  holding ``;``, a trigger holding ``:``, ...) is written in the structured form of the full format instead,
  so every gold record survives render -> parse unchanged.
* ``keyed``: the concise values with every label of the schema kept as a key, ``""`` when it has nothing
  (NER ``{"location": "", "person": "John; Mary"}``).  The label decision then stays where the full format
  teaches it (after each key, in schema order) instead of moving to a free choice of the next key, and the
  answer is still far shorter than the full one where the full one spends its length (empty event roles,
  ``{"head": ..., "tail": ...}`` objects).

The splitting helpers here are shared with :mod:`prouie_pl.parser`, so renderer and parser agree by construction.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional, Sequence

from .schema import LabelSchema, Record

FORMATS: tuple[str, ...] = ("full", "concise", "keyed")

ITEM_SEP = "; "
ARROW = " -> "
ROLE_SEP = ": "


def check_format(fmt: str, option: str = "format") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"{option} must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt


ANSWER_FORMAT_FILE = "answer_format.json"


def write_answer_format(folder, fmt: str) -> None:
    """Record in a model folder (an adapter, a merged export) the answer format it was trained to write."""
    (Path(folder) / ANSWER_FORMAT_FILE).write_text(json.dumps({"format": check_format(fmt)}) + "\n", encoding="utf-8")


def read_answer_format(folder) -> Optional[str]:
    """The answer format recorded in ``folder`` by :func:`write_answer_format`; None when there is no record.
    A record that names no known format is an error that names the file."""
    path = Path(folder) / ANSWER_FORMAT_FILE
    if not path.is_file():
        return None
    try:
        fmt = json.loads(path.read_text(encoding="utf-8")).get("format")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a JSON object with a 'format' ({err})") from None
    return check_format(fmt, f"{path}: 'format'")


def role_display(role: str) -> str:
    """Roles are written with a capital first letter in the concise format (``Subject: patient``)."""
    return role[:1].upper() + role[1:]


# ------------------------------------------------------------------------------------------ compact syntax


def split_items(s: str, start: int = 0, stop: Optional[int] = None) -> list[tuple[str, int, int]]:
    """Split ``s[start:stop]`` on ``;`` into stripped pieces ``(text, begin, end)`` (decoded offsets).

    Empty pieces are dropped.
    """
    stop = len(s) if stop is None else stop
    out = []
    i = start
    while i <= stop:
        j = s.find(";", i, stop)
        if j < 0:
            j = stop
        a, b = i, j
        while a < b and s[a].isspace():
            a += 1
        while b > a and s[b - 1].isspace():
            b -= 1
        if b > a:
            out.append((s[a:b], a, b))
        i = j + 1
    return out


def _strip_span(s: str, a: int, b: int) -> tuple[int, int]:
    while a < b and s[a].isspace():
        a += 1
    while b > a and s[b - 1].isspace():
        b -= 1
    return a, b


def split_relation(s: str, a: int, b: int) -> Optional[tuple[tuple[int, int], tuple[int, int]]]:
    """``head -> tail`` inside ``s[a:b]``: spans of head and tail, or None without an arrow."""
    k = s.find("->", a, b)
    if k < 0:
        return None
    return _strip_span(s, a, k), _strip_span(s, k + 2, b)


def split_role(s: str, a: int, b: int) -> Optional[tuple[tuple[int, int], tuple[int, int]]]:
    """``Role: argument`` inside ``s[a:b]``: spans of role and argument, or None without a colon."""
    k = s.find(":", a, b)
    if k < 0:
        return None
    return _strip_span(s, a, k), _strip_span(s, k + 1, b)


def _clean(text: str) -> bool:
    """Can ``text`` stand as one piece of the compact syntax and come back identical?"""
    return bool(text) and text == text.strip() and ";" not in text


def _concise_names(names: Sequence[str]):
    if all(_clean(n) for n in names):
        return ITEM_SEP.join(names)
    return list(names)


def _concise_pairs(pairs: Sequence[tuple[str, str]]):
    if all(_clean(h) and _clean(t) and "->" not in h for h, t in pairs):
        return ITEM_SEP.join(f"{h}{ARROW}{t}" for h, t in pairs)
    return [{"head": h, "tail": t} for h, t in pairs]


def _concise_event(ev, schema: LabelSchema):
    args = ev.arguments
    ok = _clean(ev.trigger) and ":" not in ev.trigger and all(_clean(a.name) for a in args)
    if ok:
        parts = [f"{role_display(a.role)}{ROLE_SEP}{a.name}" for a in _ordered_args(ev, schema)]
        return ev.trigger + (ROLE_SEP + ITEM_SEP.join(parts) if parts else "")
    grouped: dict[str, list[str]] = {}
    for a in _ordered_args(ev, schema):
        grouped.setdefault(a.role, []).append(a.name)
    return {"trigger": ev.trigger, "arguments": grouped}


def _ordered_args(ev, schema: LabelSchema):
    """Arguments grouped by role in schema order (roles unknown to the schema last), stable within a role."""
    order = {r: i for i, r in enumerate(schema.roles.get(ev.type, ()))}
    return sorted(ev.arguments, key=lambda a: order.get(a.role, len(order)))


# ------------------------------------------------------------------------------------------ targets


def target_object(record: Record, fmt: str, schema: Optional[LabelSchema] = None) -> dict:
    """The target as a Python object (``json.dumps`` of it is the training target)."""
    check_format(fmt)
    schema = schema or record.schema
    full, keyed = fmt == "full", fmt == "keyed"
    out: dict = {}
    if record.task == "NER":
        by = _group(schema.labels, ((e.type, e.name) for e in record.entities))
        for label, names in by.items():
            if full:
                out[label] = list(names)
            elif names:
                out[label] = _concise_names(names)
            elif keyed:
                out[label] = ""
    elif record.task == "RE":
        by = _group(schema.labels, ((r.type, (r.head.name, r.tail.name)) for r in record.relations))
        for label, pairs in by.items():
            if full:
                out[label] = [{"head": h, "tail": t} for h, t in pairs]
            elif pairs:
                out[label] = _concise_pairs(pairs)
            elif keyed:
                out[label] = ""
    else:
        by = _group(schema.labels, ((e.type, e) for e in record.events))
        for label, events in by.items():
            if full:
                out[label] = [_full_event(ev, schema) for ev in events]
            elif events:
                vals = [_concise_event(ev, schema) for ev in events]
                out[label] = vals[0] if len(vals) == 1 and isinstance(vals[0], str) else vals
            elif keyed:
                out[label] = ""
    return out


def _full_event(ev, schema: LabelSchema) -> dict:
    roles = list(schema.roles.get(ev.type, ()))
    args: dict[str, list[str]] = {r: [] for r in roles}
    for a in ev.arguments:
        args.setdefault(a.role, []).append(a.name)
    return {"trigger": ev.trigger, "arguments": args}


def _group(labels: Sequence[str], pairs) -> dict:
    """Values grouped by label in schema order; labels outside the schema follow in order of appearance."""
    by: dict = {label: [] for label in labels}
    for label, value in pairs:
        by.setdefault(label, []).append(value)
    return by


def render_target(record: Record, fmt: str, schema: Optional[LabelSchema] = None) -> str:
    """The gold answer as the model should write it."""
    return json.dumps(target_object(record, fmt, schema), ensure_ascii=False)


# ------------------------------------------------------------------------------------------ prompts

_TASK_LINE = {
    "NER": "Task: named entity recognition. Find the entities of the given types in the text.",
    "RE": "Task: relation extraction. Find the relations of the given types between entities in the text.",
    "EE": "Task: event extraction. Find the events of the given types in the text, each with its trigger and arguments.",
}

_OUTPUT_LINE = {
    ("NER", "full"): 'Answer with a JSON object that has every entity type as a key and the list of its entities as the value ([] when there is none).',
    ("NER", "concise"): 'Answer with a JSON object that maps each entity type found to its entities joined by "; ". Leave out types with no entity.',
    ("RE", "full"): 'Answer with a JSON object that has every relation type as a key and a list of {"head": ..., "tail": ...} pairs as the value ([] when there is none).',
    ("RE", "concise"): 'Answer with a JSON object that maps each relation type found to its pairs written "head -> tail" and joined by "; ". Leave out types with no relation.',
    ("NER", "keyed"): 'Answer with a JSON object that has every entity type as a key and its entities joined by "; " as the value ("" when there is none).',
    ("RE", "keyed"): 'Answer with a JSON object that has every relation type as a key and its pairs written "head -> tail" and joined by "; " as the value ("" when there is none).',
    ("EE", "keyed"): 'Answer with a JSON object that has every event type as a key and its event written "trigger: Role: argument; Role: argument" as the value (a list when there are several, "" when there is none). Leave out empty roles.',
    ("EE", "full"): 'Answer with a JSON object that has every event type as a key and a list of events as the value ([] when there is none); each event is {"trigger": ..., "arguments": {role: [arguments]}} and lists every role of its type.',
    ("EE", "concise"): 'Answer with a JSON object that maps each event type found to its event written "trigger: Role: argument; Role: argument" (a list when there are several). Leave out empty types and roles.',
}


def schema_line(schema: LabelSchema) -> str:
    if schema.task == "NER":
        return "Entity types: " + ", ".join(schema.labels) + "."
    if schema.task == "RE":
        return "Relation types: " + ", ".join(schema.labels) + "."
    parts = [f"{t} ({', '.join(schema.roles.get(t, ())) or 'no roles'})" for t in schema.labels]
    return "Event types and their argument roles: " + "; ".join(parts) + "."


def build_prompt(record: Record, fmt: str, schema: Optional[LabelSchema] = None) -> str:
    """The user message: task instruction, label schema as options, output format, text.

    The chat template is applied later by the model's tokenizer.
    """
    check_format(fmt)
    schema = schema or record.schema
    return "\n".join([
        _TASK_LINE[record.task],
        schema_line(schema),
        _OUTPUT_LINE[(record.task, fmt)],
        f"Text: {record.sentence}",
    ])


def shuffled_schema(schema: LabelSchema, rng: random.Random) -> LabelSchema:
    """The schema with its labels in a random order (prompt options and full-format keys follow it)."""
    labels = list(schema.labels)
    rng.shuffle(labels)
    return schema.reordered(labels)


def example(record: Record, fmt: str, shuffle_labels: bool = False, rng: Optional[random.Random] = None) -> tuple[str, str]:
    """(prompt, target) for one record; ``shuffle_labels`` permutes the label order in both."""
    schema = record.schema
    if shuffle_labels:
        schema = shuffled_schema(schema, rng or random.Random())
    return build_prompt(record, fmt, schema), render_target(record, fmt, schema)
