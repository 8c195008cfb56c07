"""Reader for the IE INSTRUCTIONS layout: ``ROOT/{NER,RE,EE}/<Dataset>/{train,dev,test}.json`` + ``labels.json``.

Every problem in the data is reported as one line naming the file, the record index and what is wrong.  With
``on_error="error"`` (the default) the first pass collects every problem of the selected files and raises
:class:`DataError` (the CLI prints the lines and exits with code 2, no traceback); with ``on_error="skip"`` bad
records are dropped and a count per kind of problem is reported.

Writing goes the other way: :func:`record_to_json` turns a :class:`Record` back into the layout's JSON form and
:func:`write_dataset` writes one data set folder.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .schema import TASKS, Argument, Entity, Event, LabelSchema, Record, Relation

SPLITS = ("train", "dev", "test")
ON_ERROR = ("error", "skip")
MAX_LINES_SHOWN = 50
_SKIP_HINT = "fix the records above, or choose on_error=skip (--on_error skip, --data.on_error skip) to drop them"


class DataError(Exception):
    """Bad input data.  ``lines`` holds one line per problem: ``FILE: record N: what is wrong``."""

    def __init__(self, lines: Sequence[str] | str, hint: str = ""):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        self.hint = hint
        shown = self.lines[:MAX_LINES_SHOWN]
        if len(self.lines) > MAX_LINES_SHOWN:
            shown.append(f"... and {len(self.lines) - MAX_LINES_SHOWN} more problems")
        if hint:
            shown.append(hint)
        super().__init__("\n".join(shown))


@dataclass
class Problem:
    kind: str
    line: str


@dataclass
class DatasetInfo:
    task: str
    name: str
    path: Path
    schema: LabelSchema

    @property
    def id(self) -> str:
        return f"{self.task}/{self.name}"


@dataclass
class LoadReport:
    """What loading skipped, by kind of problem (only filled with ``on_error="skip"``)."""

    skipped: Counter = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.skipped:
            return "no records skipped"
        parts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items()))
        return f"skipped {sum(self.skipped.values())} records: {parts}"


# ---------------------------------------------------------------------------------------------------- labels


def load_schema(task: str, labels_path: Path) -> LabelSchema:
    if not labels_path.is_file():
        raise DataError(f"{labels_path}: labels.json is missing; every data set folder needs one")
    try:
        raw = json.loads(labels_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{labels_path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if task == "EE":
        roles: dict[str, tuple[str, ...]] = {}
        if isinstance(raw, dict):
            items = list(raw.items())
        elif isinstance(raw, list) and all(isinstance(x, dict) for x in raw):
            try:
                items = [(x["event_type"], x.get("role_list", [])) for x in raw]
            except KeyError:
                raise DataError(f"{labels_path}: an EE labels list needs objects with 'event_type' and 'role_list'") from None
        else:
            raise DataError(
                f"{labels_path}: EE labels must be a dict {{type: [roles]}} or a list of {{'event_type', 'role_list'}}"
            )
        for etype, rlist in items:
            if not isinstance(etype, str) or not isinstance(rlist, list) or not all(isinstance(r, str) for r in rlist):
                raise DataError(f"{labels_path}: event type {etype!r} needs a list of role names")
            roles[etype] = tuple(rlist)
        return LabelSchema("EE", tuple(roles), roles)
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise DataError(f"{labels_path}: {task} labels must be a JSON list of strings")
    return LabelSchema(task, tuple(raw))


# ---------------------------------------------------------------------------------------------------- discovery


def discover(root: str | os.PathLike, tasks: Optional[Iterable[str]] = None, datasets: Optional[Iterable[str]] = None) -> list[DatasetInfo]:
    """Data sets under ``root``, in task order NER -> RE -> EE then by name.

    ``datasets`` entries are ``Name`` or ``TASK/Name``; an unknown one raises :class:`DataError` listing
    what exists.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data_dir {str(root)!r} does not exist or is not a folder (expected ROOT/{{NER,RE,EE}}/<Dataset>/)")
    want_tasks = list(TASKS) if tasks is None else [t.upper() for t in tasks]
    for t in want_tasks:
        if t not in TASKS:
            raise DataError(f"unknown task {t!r} in tasks; choose from {', '.join(TASKS)}")
    found: list[DatasetInfo] = []
    for task in TASKS:
        if task not in want_tasks or not (root / task).is_dir():
            continue
        for sub in sorted(p for p in (root / task).iterdir() if p.is_dir()):
            found.append(DatasetInfo(task, sub.name, sub, None))  # type: ignore[arg-type]
    if datasets is not None:
        wanted = list(datasets)
        chosen: list[DatasetInfo] = []
        for name in wanted:
            hits = [d for d in found if name in (d.name, d.id)]
            if not hits:
                avail = ", ".join(d.id for d in found) or "none"
                raise DataError(f"unknown data set {name!r} in datasets (under {root}); available: {avail}")
            chosen.extend(h for h in hits if h not in chosen)
        found = sorted(chosen, key=lambda d: (TASKS.index(d.task), d.name))
    if not found:
        raise DataError(f"no data sets found under {root} for tasks {', '.join(want_tasks)} (expected ROOT/TASK/<Dataset>/labels.json)")
    for d in found:
        d.schema = load_schema(d.task, d.path / "labels.json")
    return found


# ---------------------------------------------------------------------------------------------------- records

_RESYNC = re.compile(r'\{\s*"sentence"')


def _iter_json_array(text: str, path: Path, problems: list[Problem]):
    """Yield (index, obj) for each element of a top-level JSON array; report breakage per record.

    A record that is not valid JSON is reported with its index; reading resumes at the next object that starts
    with a ``"sentence"`` key, and the records lost in between are counted.
    """
    dec = json.JSONDecoder()
    n = len(text)
    i = 0
    while i < n and text[i].isspace():
        i += 1
    if i >= n or text[i] != "[":
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(Problem("invalid JSON", f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"))
            return
        problems.append(Problem("invalid JSON", f"{path}: the file must hold a JSON list of records"))
        return
    i += 1
    index = 0
    while True:
        while i < n and (text[i].isspace() or text[i] == ","):
            i += 1
        if i >= n:
            problems.append(Problem("invalid JSON", f"{path}: record {index}: invalid JSON: the list is not closed (file truncated?)"))
            return
        if text[i] == "]":
            return
        try:
            obj, j = dec.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            m = _RESYNC.search(text, exc.pos + 1)
            if m is None:
                problems.append(Problem("invalid JSON", f"{path}: record {index}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; the rest of the file could not be read"))
                return
            problems.append(Problem("invalid JSON", f"{path}: record {index}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"))
            i = m.start()
            index += 1
            continue
        yield index, obj
        index += 1
        i = j


def _check_pos(pos, name: str, sentence: str, what: str) -> tuple[Optional[tuple[int, int]], Optional[Problem]]:
    if pos is None:
        return None, None
    if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) for p in pos)):
        return None, Problem("bad pos", f"{what} 'pos' {pos!r} must be [start, end] character offsets")
    s, e = pos
    if not (0 <= s <= e <= len(sentence)):
        return None, Problem("pos outside sentence", f"{what} 'pos' {list(pos)} lies outside the sentence (length {len(sentence)})")
    if sentence[s:e] != name:
        return None, Problem("pos does not match name", f"{what} 'pos' {list(pos)} covers {sentence[s:e]!r}, not the name {name!r}")
    return (s, e), None


def _need_str(obj: dict, key: str, what: str) -> str:
    if key not in obj:
        raise _RecordProblem("missing field", f"{what} has no '{key}' field")
    val = obj[key]
    if not isinstance(val, str):
        raise _RecordProblem("missing field", f"{what} field '{key}' must be a string, not {type(val).__name__}")
    return val


def _need_list(obj: dict, key: str, what: str) -> list:
    if key not in obj:
        raise _RecordProblem("missing field", f"{what} has no '{key}' field")
    val = obj[key]
    if not isinstance(val, list):
        raise _RecordProblem("missing field", f"{what} field '{key}' must be a list, not {type(val).__name__}")
    return val


class _RecordProblem(Exception):
    def __init__(self, kind: str, msg: str):
        super().__init__(msg)
        self.kind = kind


def _pos_or_raise(obj: dict, name: str, sentence: str, what: str):
    pos, prob = _check_pos(obj.get("pos"), name, sentence, what)
    if prob is not None:
        raise _RecordProblem(prob.kind, prob.line)
    return pos


def _entity(obj, sentence: str, what: str, schema: Optional[LabelSchema]) -> Entity:
    if not isinstance(obj, dict):
        raise _RecordProblem("missing field", f"{what} must be an object")
    name = _need_str(obj, "name", what)
    etype = obj.get("type", "")
    if not isinstance(etype, str):
        raise _RecordProblem("missing field", f"{what} field 'type' must be a string")
    if schema is not None:
        if "type" not in obj:
            raise _RecordProblem("missing field", f"{what} has no 'type' field")
        if etype not in schema.labels:
            raise _RecordProblem("label not in labels.json", f"{what} type {etype!r} is not in labels.json")
    return Entity(name, etype, _pos_or_raise(obj, name, sentence, what))


def parse_record(obj, task: str, dataset: str, schema: LabelSchema, index: int, split: str) -> Record:
    """Validate one raw record and build a :class:`Record`; raises ``_RecordProblem``."""
    if not isinstance(obj, dict):
        raise _RecordProblem("missing field", "a record must be a JSON object")
    sentence = _need_str(obj, "sentence", "record")
    if task == "NER":
        ents = tuple(_entity(e, sentence, f"entity {i}", schema) for i, e in enumerate(_need_list(obj, "entities", "record")))
        return Record(sentence, task, dataset, schema, index, split, entities=ents)
    if task == "RE":
        rels = []
        for i, r in enumerate(_need_list(obj, "relations", "record")):
            what = f"relation {i}"
            if not isinstance(r, dict):
                raise _RecordProblem("missing field", f"{what} must be an object")
            rtype = _need_str(r, "type", what)
            if rtype not in schema.labels:
                raise _RecordProblem("label not in labels.json", f"{what} type {rtype!r} is not in labels.json")
            for side in ("head", "tail"):
                if side not in r:
                    raise _RecordProblem("missing field", f"{what} has no '{side}' field")
            head = _entity(r["head"], sentence, f"{what} head", None)
            tail = _entity(r["tail"], sentence, f"{what} tail", None)
            rels.append(Relation(head, rtype, tail))
        return Record(sentence, task, dataset, schema, index, split, relations=tuple(rels))
    events = []
    for i, ev in enumerate(_need_list(obj, "events", "record")):
        what = f"event {i}"
        if not isinstance(ev, dict):
            raise _RecordProblem("missing field", f"{what} must be an object")
        trigger = _need_str(ev, "trigger", what)
        etype = _need_str(ev, "type", what)
        if etype not in schema.roles:
            raise _RecordProblem("label not in labels.json", f"{what} type {etype!r} is not in labels.json")
        pos = _pos_or_raise(ev, trigger, sentence, what)
        raw_args = ev.get("arguments", [])
        if not isinstance(raw_args, list):
            raise _RecordProblem("missing field", f"{what} field 'arguments' must be a list")
        args = []
        for j, a in enumerate(raw_args):
            awhat = f"{what} argument {j}"
            if not isinstance(a, dict):
                raise _RecordProblem("missing field", f"{awhat} must be an object")
            name = _need_str(a, "name", awhat)
            role = _need_str(a, "role", awhat)
            if role not in schema.roles[etype]:
                raise _RecordProblem("label not in labels.json", f"{awhat} role {role!r} is not a role of {etype!r} in labels.json")
            args.append(Argument(name, role, _pos_or_raise(a, name, sentence, awhat)))
        events.append(Event(trigger, etype, pos, tuple(args)))
    return Record(sentence, task, dataset, schema, index, split, events=tuple(events))


def read_split_file(info: DatasetInfo, split: str, on_error: str = "error", max_records: Optional[int] = None,
                    report: Optional[LoadReport] = None) -> list[Record]:
    """Records of one split file of one data set (original indices kept)."""
    if on_error not in ON_ERROR:
        raise DataError(f"on_error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
    path = info.path / f"{split}.json"
    if not path.is_file():
        raise DataError(f"{path}: split file is missing (data set {info.id}, split {split!r})")
    text = path.read_text(encoding="utf-8")
    problems: list[Problem] = []
    records: list[Record] = []
    for index, obj in _iter_json_array(text, path, problems):
        try:
            records.append(parse_record(obj, info.task, info.name, info.schema, index, split))
        except _RecordProblem as exc:
            problems.append(Problem(exc.kind, f"{path}: record {index}: {exc}"))
        if max_records is not None and len(records) >= max_records:
            break
    if problems:
        if on_error == "error":
            raise DataError([p.line for p in problems], hint=_SKIP_HINT)
        if report is not None:
            report.skipped.update(p.kind for p in problems)
            report.lines.extend(p.line for p in problems)
    return records


def load_records(root: str | os.PathLike, split: str, tasks: Optional[Iterable[str]] = None,
                 datasets: Optional[Iterable[str]] = None, max_records: Optional[int] = None,
                 on_error: str = "error", report: Optional[LoadReport] = None) -> list[Record]:
    """All records of ``split`` for the selected data sets, in task order, capped per data set."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if max_records is not None and max_records < 0:
        raise DataError(f"max_records must be >= 0, not {max_records}")
    out: list[Record] = []
    problems: list[str] = []
    for info in discover(root, tasks, datasets):
        try:
            out.extend(read_split_file(info, split, on_error, max_records, report))
        except DataError as exc:  # keep reading: every bad file is reported in one go
            problems.extend(exc.lines)
    if problems:
        raise DataError(problems, hint=_SKIP_HINT)
    return out


# ---------------------------------------------------------------------------------------------------- writing


def schema_json(schema: LabelSchema):
    """A schema in ``labels.json``'s form: a list of labels, or for EE a dict ``{event type: roles}``."""
    return dict(schema.roles) if schema.task == "EE" else list(schema.labels)


def _pos(span) -> dict:
    return {} if span is None else {"pos": list(span)}


def _entity_json(ent: Entity) -> dict:
    return {"name": ent.name, "type": ent.type, **_pos(ent.pos)}


def record_to_json(rec: Record) -> dict:
    """A :class:`Record` back in the layout's JSON form; reading it again gives an equal record.

    ``pos`` is written where the record has one and left out where it has none (the field is optional).
    """
    if rec.task == "NER":
        return {"sentence": rec.sentence, "entities": [_entity_json(e) for e in rec.entities]}
    if rec.task == "RE":
        return {"sentence": rec.sentence,
                "relations": [{"head": _entity_json(r.head), "type": r.type, "tail": _entity_json(r.tail)} for r in rec.relations]}
    return {"sentence": rec.sentence,
            "events": [{"trigger": e.trigger, "type": e.type, **_pos(e.pos),
                        "arguments": [{"name": a.name, "role": a.role, **_pos(a.pos)} for a in e.arguments]} for e in rec.events]}


def write_json_array(path: str | os.PathLike, records: list[dict], separators: tuple[str, str] | None = None) -> None:
    """Write ``records`` as a UTF-8 JSON array with one record per line, so a diff of two versions shows records."""
    lines = ",\n".join(json.dumps(r, ensure_ascii=False, separators=separators) for r in records)
    Path(path).write_text(f"[\n{lines}\n]\n", encoding="utf-8")


def write_dataset(root: str | os.PathLike, task: str, name: str, labels, splits: dict[str, list]) -> Path:
    """Write one data set in the layout: ``ROOT/TASK/NAME/labels.json`` and one ``<split>.json`` per entry of ``splits``.

    ``labels`` is the content of ``labels.json`` (or a :class:`LabelSchema`); records are layout dicts or
    :class:`Record` objects (written with :func:`record_to_json`).  Returns the data set's folder.
    """
    folder = Path(root) / task / name
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(labels, LabelSchema):
        labels = schema_json(labels)
    (folder / "labels.json").write_text(json.dumps(labels, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for split, records in splits.items():
        write_json_array(folder / f"{split}.json", [record_to_json(r) if isinstance(r, Record) else r for r in records])
    return folder
