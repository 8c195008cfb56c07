"""The label schema a user extracts with: entity types, relation types, event types with their roles.

Written as YAML or JSON (any subset of the three keys; each one present runs its task)::

    entities: [person, organization, location]
    relations: [work for, live in]
    events:
      attack: [attacker, target, place]
      meet: [participant]

or taken from a data set's ``labels.json`` (``DATA_DIR/TASK/Dataset``, the task read from the folder name).
Every problem is reported with the file and key it concerns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from .schema import TASKS, LabelSchema

KEYS = ("entities", "relations", "events")
_TASK_OF = {"entities": "NER", "relations": "RE", "events": "EE"}
EXAMPLE = "entities: [person, location]  /  relations: [work for]  /  events: {attack: [attacker, target]}"


@dataclass(frozen=True)
class ExtractionSchema:
    """What to extract.  ``events`` maps each event type to its argument roles."""

    entities: tuple[str, ...] = ()
    relations: tuple[str, ...] = ()
    events: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def label_schemas(self) -> dict[str, LabelSchema]:
        """One :class:`LabelSchema` per task to run, in task order (NER, RE, EE)."""
        out: dict[str, LabelSchema] = {}
        if self.entities:
            out["NER"] = LabelSchema("NER", tuple(self.entities))
        if self.relations:
            out["RE"] = LabelSchema("RE", tuple(self.relations))
        if self.events:
            roles = {t: tuple(r) for t, r in self.events.items()}
            out["EE"] = LabelSchema("EE", tuple(roles), roles)
        return out

    @property
    def empty(self) -> bool:
        return not (self.entities or self.relations or self.events)

    def merged(self, other: "ExtractionSchema", where: str) -> "ExtractionSchema":
        """This schema and ``other`` together; a task given by both is an error naming ``where``."""
        for key in KEYS:
            if getattr(self, key) and getattr(other, key):
                raise ValueError(f"{where}: {key} are given twice (by --schema and --labels_from); keep one")
        return ExtractionSchema(self.entities or other.entities, self.relations or other.relations, dict(self.events or other.events))

    # -------------------------------------------------------------- building

    @classmethod
    def from_mapping(cls, obj: Any, where: str = "schema") -> "ExtractionSchema":
        """Validate a parsed schema (``where`` names its source in error messages)."""
        if obj is None:
            obj = {}
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where}: a schema is a mapping with any of {', '.join(KEYS)} (example: {EXAMPLE}), not {type(obj).__name__}")
        unknown = [str(k) for k in obj if k not in KEYS]
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}; a schema has {', '.join(KEYS)}")
        entities = _labels(obj.get("entities"), f"{where}: entities")
        relations = _labels(obj.get("relations"), f"{where}: relations")
        events = _events(obj.get("events"), f"{where}: events")
        return cls(entities, relations, events)

    @classmethod
    def from_file(cls, path: str | Path) -> "ExtractionSchema":
        """Read a YAML or JSON schema file."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"--schema {str(p)!r} does not exist" if not p.exists() else f"--schema {str(p)!r} is not a file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{p}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save the schema as UTF-8") from None
        return cls.from_mapping(parse_schema_text(text, str(p)), str(p))

    @classmethod
    def from_labels(cls, folder: str | Path) -> "ExtractionSchema":
        """The schema of a data set: ``DATA_DIR/TASK/Dataset`` (or its ``labels.json``)."""
        from .reader import load_schema

        p = Path(folder)
        labels = p if p.name == "labels.json" else p / "labels.json"
        if not p.exists():
            raise ValueError(f"--labels_from {str(p)!r} does not exist (expected DATA_DIR/TASK/Dataset with a labels.json)")
        task = labels.parent.parent.name.upper()
        if task not in TASKS:
            raise ValueError(f"--labels_from {str(p)!r}: cannot tell the task; the data set folder must sit in a folder named NER, RE or EE")
        ls = load_schema(task, labels)
        if task == "NER":
            return cls(entities=ls.labels).validated(str(labels))
        if task == "RE":
            return cls(relations=ls.labels).validated(str(labels))
        return cls(events={t: ls.roles.get(t, ()) for t in ls.labels}).validated(str(labels))

    def validated(self, where: str) -> "ExtractionSchema":
        return ExtractionSchema.from_mapping({"entities": list(self.entities), "relations": list(self.relations),
                                              "events": {t: list(r) for t, r in self.events.items()}}, where)


def parse_schema_text(text: str, where: str) -> Any:
    """YAML (JSON is YAML too); a syntax error becomes one line naming the file, line and column."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML or JSON{at}: {problem}") from None


def _name(x: Any, where: str) -> str:
    if isinstance(x, bool) or not isinstance(x, (str, int, float)):
        raise ValueError(f"{where}: {x!r} is not a name")
    s = str(x).strip()
    if not s:
        raise ValueError(f"{where}: an empty name")
    return s


def _labels(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        raise ValueError(f"{where}: write a list ([{raw}]), not a single string")
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"{where}: must be a list of type names, not {type(raw).__name__}")
    names = [_name(x, where) for x in raw]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}: {', '.join(repr(d) for d in dup)} listed twice")
    return tuple(names)


def _events(raw: Any, where: str) -> dict[str, tuple[str, ...]]:
    if raw is None:
        return {}
    if isinstance(raw, (list, tuple)):  # event types without roles, or labels.json's list of {event_type, role_list}
        items = []
        for x in raw:
            if isinstance(x, Mapping) and "event_type" in x:
                items.append((x["event_type"], x.get("role_list") or []))
            else:
                items.append((x, []))
    elif isinstance(raw, Mapping):
        items = list(raw.items())
    else:
        raise ValueError(f"{where}: must map each event type to its list of roles, not {type(raw).__name__}")
    out: dict[str, tuple[str, ...]] = {}
    for etype, roles in items:
        t = _name(etype, where)
        if t in out:
            raise ValueError(f"{where}: event type {t!r} listed twice")
        roles = _labels(roles, f"{where}: {t}") if roles is not None else ()
        for r in roles:
            if set(r) & set(":;"):
                raise ValueError(f"{where}: {t}: role {r!r} cannot hold ':' or ';' (the answer format separates roles with them); rename it")
        out[t] = roles
    return out


def load_extraction_schema(schema_path: Optional[str], labels_from: Optional[list[str]] = None) -> ExtractionSchema:
    """The schema of ``--schema`` and/or ``--labels_from``; an empty one is an error saying what to write."""
    schema = ExtractionSchema()
    where = "--schema"
    if schema_path:
        schema = ExtractionSchema.from_file(schema_path)
        where = schema_path
    for folder in labels_from or []:
        schema = schema.merged(ExtractionSchema.from_labels(folder), folder)
    if schema.empty:
        if not schema_path and not labels_from:
            raise ValueError(f"give a schema: --schema FILE (YAML or JSON, e.g. {EXAMPLE}) or --labels_from DATA_DIR/TASK/Dataset")
        raise ValueError(f"{where}: the schema is empty; list at least one type, e.g. {EXAMPLE}")
    return schema


def as_schema(schema: Any) -> ExtractionSchema:
    """An :class:`ExtractionSchema` from what the Python API accepts: the object itself, a mapping, or a file path."""
    if isinstance(schema, ExtractionSchema):
        out = schema
    elif isinstance(schema, (str, Path)):
        out = ExtractionSchema.from_file(schema)
    elif isinstance(schema, Mapping):
        out = ExtractionSchema.from_mapping(schema)
    else:
        raise ValueError(f"schema must be an ExtractionSchema, a mapping ({EXAMPLE}) or a file path, not {type(schema).__name__}")
    if out.empty:
        raise ValueError(f"the schema is empty; list at least one type, e.g. {EXAMPLE}")
    return out

