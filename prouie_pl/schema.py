"""Typed records of the IE INSTRUCTIONS layout and the structural units everything else is measured in.

A :class:`Record` is one sentence of one data set with its gold structures.  A :class:`Unit` is the smallest
thing the scorer counts and the GRPO reward rewards: an entity, a relation triple, an event trigger or an event
argument.  Gold records and parsed model outputs both turn into units, so scoring, rewards and the render/parse
round trip all compare the same kind of object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

TASKS: tuple[str, ...] = ("NER", "RE", "EE")
"""Tasks in ProUIE's difficulty order (the CM curriculum follows it)."""

UNIT_KINDS: tuple[str, ...] = ("entity", "relation", "trigger", "argument")

Span = Optional[tuple[int, int]]


@dataclass(frozen=True)
class Entity:
    name: str
    type: str = ""
    pos: Span = None


@dataclass(frozen=True)
class Relation:
    head: Entity
    type: str
    tail: Entity


@dataclass(frozen=True)
class Argument:
    name: str
    role: str
    pos: Span = None


@dataclass(frozen=True)
class Event:
    trigger: str
    type: str
    pos: Span = None
    arguments: tuple[Argument, ...] = ()


@dataclass(frozen=True)
class LabelSchema:
    """The label inventory of one data set (``labels.json``).

    ``labels`` are entity types (NER), relation types (RE) or event types (EE); ``roles`` maps each event type
    to its argument roles (EE only).  The order is the order shown in prompts and used by the full format.
    """

    task: str
    labels: tuple[str, ...]
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __hash__(self) -> int:  # dicts are not hashable; the schema is immutable in practice
        return hash((self.task, self.labels, tuple((k, v) for k, v in self.roles.items())))

    def reordered(self, labels: Iterable[str]) -> "LabelSchema":
        """The same schema with labels (and, for EE, nothing else) in another order."""
        labels = tuple(labels)
        if sorted(labels) != sorted(self.labels):
            raise ValueError("reordered() must keep the same labels")
        return LabelSchema(self.task, labels, dict(self.roles))


@dataclass(frozen=True)
class Record:
    """One sentence with its gold structures.  ``index`` is the record's position in its split file."""

    sentence: str
    task: str
    dataset: str
    schema: LabelSchema
    index: int = 0
    split: str = ""
    entities: tuple[Entity, ...] = ()
    relations: tuple[Relation, ...] = ()
    events: tuple[Event, ...] = ()

    @property
    def uid(self) -> tuple[str, str, int]:
        return (self.task, self.dataset, self.index)


_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Matching form of a string: case-folded, whitespace runs collapsed, ends stripped."""
    return _WS.sub(" ", text).strip().casefold()


@dataclass(frozen=True)
class Unit:
    """One structural unit, from gold data or parsed from a model output.

    ``label`` is the entity type, relation type or event type.  ``text`` is the entity name, the trigger or the
    argument; relations use ``head``/``tail`` instead.  ``event`` numbers the event a trigger or argument
    belongs to (in output order), so events can be rebuilt.  ``end`` is the character offset in the output
    text right after the unit's last character (0 for gold units), which the GRPO reward maps to a token.
    ``in_schema`` is False when the label or role is not in the data set's schema.
    """

    kind: str
    label: str
    text: str = ""
    head: str = ""
    tail: str = ""
    role: str = ""
    event: int = -1
    end: int = 0
    in_schema: bool = True

    def key(self) -> tuple[str, ...]:
        """What two units must share to match (normalised strings)."""
        if self.kind == "entity":
            return ("entity", normalize(self.label), normalize(self.text))
        if self.kind == "relation":
            return ("relation", normalize(self.head), normalize(self.label), normalize(self.tail))
        if self.kind == "trigger":
            return ("trigger", normalize(self.label), normalize(self.text))
        return ("argument", normalize(self.label), normalize(self.role), normalize(self.text))

    def exact(self) -> tuple[str, ...]:
        """Un-normalised identity, used by the render/parse round trip."""
        return (self.kind, self.label, self.text, self.head, self.tail, self.role)


def record_units(record: Record) -> list[Unit]:
    """Gold units of a record, in the record's own order (events: trigger, then its arguments)."""
    units: list[Unit] = []
    for ent in record.entities:
        units.append(Unit("entity", ent.type, text=ent.name))
    for rel in record.relations:
        units.append(Unit("relation", rel.type, head=rel.head.name, tail=rel.tail.name))
    for i, ev in enumerate(record.events):
        units.append(Unit("trigger", ev.type, text=ev.trigger, event=i))
        for arg in ev.arguments:
            units.append(Unit("argument", ev.type, text=arg.name, role=arg.role, event=i))
    return units


def count_units(record: Record) -> int:
    return len(record.entities) + len(record.relations) + sum(1 + len(e.arguments) for e in record.events)
