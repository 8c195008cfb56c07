"""Read a model's output back into structural units; never raises.

One function, :func:`parse_output`, reads both target formats (and the structured fallbacks of the concise one)
for NER, RE and EE.  It tolerates what generation produces: truncated JSON, text before or after the object,
single quotes, trailing commas, unknown labels, values nested the wrong way.  It returns every unit it could
recover, in the order the units appear in the text, each with the character offset where its text ends (the
GRPO reward maps these offsets to tokens), and ``ok=False`` with a list of problems when the output was not
clean.

Truncation rule: a unit counts only once its text is complete, i.e. its string was closed or a separator
(``;``, ``->``, ``:``) followed it.  A name cut off mid-way by the length limit is never a unit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from .formats import split_items, split_relation, split_role
from .schema import LabelSchema, Unit, normalize

# ------------------------------------------------------------------------------------------ tolerant JSON

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<sq>'(?:[^'\\]|\\.)*')
  | (?P<ustr>["'](?:[^"\\]|\\.)*\\?\Z)
  | (?P<p>[{}\[\]:,])
  | (?P<num>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<lit>true|false|null|None|True|False)
  | (?P<other>[^\s{}\[\]:,"']+)
  | (?P<stray>["'])
    """,
    re.S | re.X,
)

_CONTROL = re.compile(r"[\x00-\x1f]")
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_JSON_ESCAPES = set('"\\/bfnrt')
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "'": "'"}


class _Str:
    """A string token: decoded value, whether it was closed, and raw offsets of its decoded characters."""

    __slots__ = ("value", "start", "end", "complete", "valid", "_offs")

    def __init__(self, raw: str, start: int, end: int, complete: bool):
        self.start, self.end, self.complete = start, end, complete
        body = raw[1:-1] if complete else raw[1:]
        # strict JSON: no raw control characters, only the standard escapes
        self.valid = not _CONTROL.search(body)
        if "\\" not in body:
            self.value = body
            self._offs = None
            return
        chars: list[str] = []
        offs: list[int] = []
        i, n = 0, len(body)
        while i < n:
            c = body[i]
            if c == "\\" and i + 1 < n:
                e = body[i + 1]
                if e == "u" and _HEX4.fullmatch(body, i + 2, i + 6):
                    chars.append(chr(int(body[i + 2:i + 6], 16)))
                    offs.append(start + 1 + i)
                    i += 6
                    continue
                if e not in _JSON_ESCAPES:
                    self.valid = False
                chars.append(_ESCAPES.get(e, e))
                offs.append(start + 1 + i)
                i += 2
                continue
            if c == "\\":  # a lone backslash at the very end of a truncated string
                break
            chars.append(c)
            offs.append(start + 1 + i)
            i += 1
        self.value = "".join(chars)
        self._offs = offs

    def raw_end(self, k: int) -> int:
        """Raw text offset just after decoded character ``k - 1`` (``k`` = decoded end index)."""
        if k <= 0:
            return self.start + 1
        if self._offs is None:
            return self.start + 1 + k
        # the raw end of character k-1 is the raw start of character k (or the closing quote)
        if k < len(self._offs):
            return self._offs[k]
        return self.end - 1 if self.complete else self.end


class _Node:
    __slots__ = ("kind", "value", "start", "end", "complete")

    def __init__(self, kind: str, value, start: int, end: int, complete: bool = True):
        self.kind, self.value, self.start, self.end, self.complete = kind, value, start, end, complete


class _JSONReader:
    """Recursive descent over regex tokens, recovering from truncation and common slips."""

    def __init__(self, text: str, start: int, problems: list[str]):
        self.text = text
        self.toks: list[tuple[str, str, int, int]] = []
        for m in _TOKEN.finditer(text, start):
            kind = m.lastgroup
            if kind == "stray":  # a quote that opens no string: skipped, but the output is not clean JSON
                msg = f"stray quote at offset {m.start()}"
                if msg not in problems:
                    problems.append(msg)
            elif kind != "ws":
                self.toks.append((kind, m.group(), m.start(), m.end()))
        self.i = 0
        self.problems = problems
        self.depth = 0

    def _peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _problem(self, msg: str) -> None:
        if msg not in self.problems:
            self.problems.append(msg)

    def value(self) -> Optional[_Node]:
        tok = self._peek()
        if tok is None:
            return None
        kind, raw, s, e = tok
        self.i += 1
        if kind == "p":
            if raw == "{":
                return self._container(s, "obj", "}")
            if raw == "[":
                return self._container(s, "arr", "]")
            self._problem(f"unexpected {raw!r} at offset {s}")
            return _Node("bad", raw, s, e)
        if kind in ("str", "sq", "ustr"):
            string = _Str(raw, s, e, kind != "ustr")
            if kind == "sq" or raw[0] == "'":
                self._problem("single-quoted strings")
            if not string.valid:
                self._problem(f"invalid escape or control character in a string at offset {s}")
            return _Node("str", string, s, e, complete=kind != "ustr")
        if kind in ("num", "lit"):
            return _Node(kind, raw, s, e)
        self._problem(f"unquoted text {raw[:20]!r} at offset {s}")
        return _Node("bad", raw, s, e)

    def _container(self, start: int, kind: str, close: str) -> _Node:
        items: list = []
        self.depth += 1
        if self.depth > 64:
            self._problem("nesting too deep")
            self.i = len(self.toks)
            return _Node(kind, items, start, len(self.text), complete=False)
        expect_item = True
        while True:
            tok = self._peek()
            if tok is None:
                self.depth -= 1
                return _Node(kind, items, start, len(self.text), complete=False)
            tkind, raw, s, e = tok
            if tkind == "p" and raw == close:
                self.i += 1
                if expect_item and items:
                    self._problem("trailing comma")
                self.depth -= 1
                return _Node(kind, items, start, e)
            if tkind == "p" and raw == ",":
                self.i += 1
                if expect_item:
                    self._problem(f"extra comma at offset {s}")
                expect_item = True
                continue
            if tkind == "p" and raw in "}]":
                # wrong closer: treat as the end of this container
                self._problem(f"mismatched {raw!r} at offset {s}")
                self.i += 1
                self.depth -= 1
                return _Node(kind, items, start, e)
            if not expect_item:
                self._problem(f"missing comma at offset {s}")
            if kind == "arr":
                node = self.value()
                if node is not None:
                    items.append(node)
                    if not node.complete:
                        self.depth -= 1
                        return _Node(kind, items, start, len(self.text), complete=False)
            else:
                key = self.value()
                if key is None:
                    continue
                if key.kind != "str":
                    self._problem(f"object key is not a string at offset {key.start}")
                if not key.complete:
                    self.depth -= 1
                    return _Node(kind, items, start, len(self.text), complete=False)
                tok = self._peek()
                if tok is None:
                    self.depth -= 1
                    return _Node(kind, items, start, len(self.text), complete=False)
                if tok[0] == "p" and tok[1] == ":":
                    self.i += 1
                else:
                    self._problem(f"missing ':' after key at offset {key.start}")
                val = self.value()
                if val is None:
                    self.depth -= 1
                    return _Node(kind, items, start, len(self.text), complete=False)
                items.append((key, val))
                if not val.complete:
                    self.depth -= 1
                    return _Node(kind, items, start, len(self.text), complete=False)
            expect_item = False


# ------------------------------------------------------------------------------------------ result


@dataclass
class ParseResult:
    """Units recovered from one output.  ``ok`` is True only for a clean, complete, in-schema answer."""

    units: list[Unit] = field(default_factory=list)
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    truncated: bool = False


def parse_output(text: str, task: str, schema: Optional[LabelSchema] = None) -> ParseResult:
    """Parse ``text`` (either format) for ``task``; never raises.

    ``schema`` maps labels written in another case back to the schema's spelling and flags unknown labels and
    roles; without it every label is accepted as written.
    """
    try:
        return _parse(text, task, schema)
    except Exception as exc:  # a parser bug must never take down scoring or a GRPO step
        return ParseResult([], False, [f"internal parser error: {type(exc).__name__}: {exc}"])


def _parse(text: str, task: str, schema: Optional[LabelSchema]) -> ParseResult:
    res = ParseResult()
    if not isinstance(text, str):
        res.ok = False
        res.problems.append(f"output is {type(text).__name__}, not text")
        return res
    start = text.find("{")
    if start < 0:
        res.ok = False
        res.problems.append("no JSON object in the output" if text.strip() else "empty output")
        return res
    if text[:start].strip():
        res.problems.append("text before the JSON object")
    reader = _JSONReader(text, start, res.problems)
    root = reader.value()
    if root is None or root.kind != "obj":
        res.problems.append("the output is not a JSON object")
        res.ok = False
        return res
    if not root.complete:
        res.truncated = True
        res.problems.append("truncated JSON")
    elif reader.i < len(reader.toks):
        res.problems.append("text after the JSON object")
    ctx = _Interp(task, schema, res)
    for key, val in root.value:
        if key.kind != "str":
            continue
        ctx.label(key.value.value, val)
    res.ok = not res.problems
    return res


def _whole(node: _Node) -> Optional[tuple[str, int]]:
    """A closed JSON string used whole as one value: (text as written, raw end of its last visible character).

    The text is kept as written (not stripped) so gold values with stray spaces survive render -> parse;
    matching normalises whitespace anyway.  Blank or unfinished strings give None.
    """
    if node.kind != "str" or not node.complete:
        return None
    s: _Str = node.value
    visible = len(s.value.rstrip())
    if not visible:
        return None
    return s.value, s.raw_end(visible)


class _Interp:
    """Turns the tolerant JSON tree into units for one task."""

    def __init__(self, task: str, schema: Optional[LabelSchema], res: ParseResult):
        self.task = task
        self.res = res
        self.schema = schema
        self.labels = {normalize(x): x for x in schema.labels} if schema else None
        self.n_events = 0

    def problem(self, msg: str) -> None:
        if msg not in self.res.problems:
            self.res.problems.append(msg)

    def _resolve_label(self, raw: str) -> tuple[str, bool]:
        if self.labels is None:
            return raw, True
        hit = self.labels.get(normalize(raw))
        if hit is None:
            self.problem(f"unknown label {raw!r}")
            return raw, False
        return hit, True

    def label(self, raw_label: str, val: _Node) -> None:
        label, known = self._resolve_label(raw_label)
        if self.task == "NER":
            self._ner(label, known, val)
        elif self.task == "RE":
            self._re(label, known, val)
        else:
            self._ee(label, known, val)

    # -------------------------------------------------------------- NER

    def _ner(self, label: str, known: bool, val: _Node) -> None:
        add = self.res.units.append
        if val.kind == "str":
            s: _Str = val.value
            pieces = split_items(s.value)
            if not s.complete and pieces:
                pieces = pieces[:-1] if not s.value.rstrip().endswith(";") else pieces
            for name, _a, b in pieces:
                add(Unit("entity", label, text=name, end=s.raw_end(b), in_schema=known))
        elif val.kind == "arr":
            for item in val.value:
                if item.kind == "str":
                    whole = _whole(item)
                    if whole:
                        add(Unit("entity", label, text=whole[0], end=whole[1], in_schema=known))
                elif item.kind == "obj":
                    self.problem(f"entities of {label!r} nested in objects")
                    for k, v in item.value:
                        whole = _whole(v)
                        if k.kind == "str" and normalize(k.value.value) in ("name", "entity", "text") and whole:
                            add(Unit("entity", label, text=whole[0], end=whole[1], in_schema=known))
                elif item.kind == "arr":
                    self.problem(f"entities of {label!r} nested in lists")
                    self._ner(label, known, item)
                else:
                    self.problem(f"a non-string entity under {label!r}")
        elif val.kind in ("lit",) and val.value in ("null", "None"):
            self.problem(f"null value for {label!r}")
        else:
            self.problem(f"value of {label!r} is not a string or a list")

    # -------------------------------------------------------------- RE

    def _re(self, label: str, known: bool, val: _Node) -> None:
        if val.kind == "str":
            self._re_string(label, known, val.value)
        elif val.kind == "arr":
            for item in val.value:
                if item.kind == "obj":
                    self._re_object(label, known, item)
                elif item.kind == "str":
                    if item.complete:
                        self._re_string(label, known, item.value)
                elif item.kind == "arr" and len(item.value) == 2 and all(x.kind == "str" and x.complete for x in item.value):
                    self.problem(f"relation of {label!r} written as a [head, tail] list")
                    h, t = _whole(item.value[0]), _whole(item.value[1])
                    if h and t:
                        self._add_rel(label, known, h[0], t[0], max(h[1], t[1]))
                else:
                    self.problem(f"a relation of {label!r} that is neither an object nor 'head -> tail'")
        elif val.kind == "obj":
            self.problem(f"value of {label!r} is an object, not a list")
            self._re_object(label, known, val)
        else:
            self.problem(f"value of {label!r} is not a string or a list")

    def _add_rel(self, label: str, known: bool, head: str, tail: str, end: int) -> None:
        if not head or not tail:
            self.problem(f"relation of {label!r} with an empty head or tail")
            return
        self.res.units.append(Unit("relation", label, head=head, tail=tail, end=end, in_schema=known))

    def _re_string(self, label: str, known: bool, s: _Str) -> None:
        pieces = split_items(s.value)
        if not s.complete and pieces and not s.value.rstrip().endswith(";"):
            pieces = pieces[:-1]
        for _piece, a, b in pieces:
            spans = split_relation(s.value, a, b)
            if spans is None:
                self.problem(f"relation of {label!r} without '->'")
                continue
            (ha, hb), (ta, tb) = spans
            self._add_rel(label, known, s.value[ha:hb], s.value[ta:tb], s.raw_end(tb))

    def _re_object(self, label: str, known: bool, obj: _Node) -> None:
        fields = {normalize(k.value.value): _whole(v) for k, v in obj.value if k.kind == "str"}
        h, t = fields.get("head"), fields.get("tail")
        if not h or not t:
            if obj.complete:
                self.problem(f"relation of {label!r} without head and tail")
            return
        self._add_rel(label, known, h[0], t[0], max(h[1], t[1]))

    # -------------------------------------------------------------- EE

    def _roles(self, label: str) -> Optional[dict[str, str]]:
        if self.schema is None:
            return None
        return {normalize(r): r for r in self.schema.roles.get(label, ())}

    def _ee(self, label: str, known: bool, val: _Node) -> None:
        if val.kind == "str":
            self._ee_string(label, known, val.value)
        elif val.kind == "arr":
            for item in val.value:
                if item.kind == "str":
                    self._ee_string(label, known, item.value)
                elif item.kind == "obj":
                    self._ee_object(label, known, item)
                else:
                    self.problem(f"an event of {label!r} that is neither a string nor an object")
        elif val.kind == "obj":
            self.problem(f"value of {label!r} is an object, not a list")
            self._ee_object(label, known, val)
        else:
            self.problem(f"value of {label!r} is not a string or a list")

    def _arg(self, label: str, known: bool, roles, raw_role: str, name: str, end: int, event: int) -> None:
        role, role_known = raw_role, True
        if roles is not None:
            hit = roles.get(normalize(raw_role))
            if hit is None:
                role_known = False
                self.problem(f"unknown role {raw_role!r} for {label!r}")
            else:
                role = hit
        if not name:
            return
        self.res.units.append(Unit("argument", label, text=name, role=role, event=event, end=end, in_schema=known and role_known))

    def _ee_string(self, label: str, known: bool, s: _Str) -> None:
        v = s.value
        colon = v.find(":")
        if colon < 0:
            if not s.complete:
                return  # the trigger itself may be cut
            trig = v.strip()
            if trig:
                self.res.units.append(Unit("trigger", label, text=trig, event=self.n_events, end=s.raw_end(len(v.rstrip())), in_schema=known))
                self.n_events += 1
            return
        trig = v[:colon].strip()
        if not trig:
            self.problem(f"event of {label!r} without a trigger")
            return
        tb = len(v[:colon].rstrip())
        event = self.n_events
        self.n_events += 1
        self.res.units.append(Unit("trigger", label, text=trig, event=event, end=s.raw_end(tb), in_schema=known))
        roles = self._roles(label)
        pieces = split_items(v, colon + 1)
        if not s.complete and pieces and not v.rstrip().endswith(";"):
            pieces = pieces[:-1]
        for _p, a, b in pieces:
            spans = split_role(v, a, b)
            if spans is None:
                self.problem(f"argument of {label!r} without 'Role:'")
                continue
            (ra, rb), (xa, xb) = spans
            self._arg(label, known, roles, v[ra:rb], v[xa:xb], s.raw_end(xb), event)

    def _ee_object(self, label: str, known: bool, obj: _Node) -> None:
        trig_node = None
        args_node = None
        for k, v in obj.value:
            if k.kind != "str":
                continue
            name = normalize(k.value.value)
            if name == "trigger":
                trig_node = v
            elif name in ("arguments", "args"):
                args_node = v
        trig = _whole(trig_node) if trig_node is not None else None
        if not trig:
            if obj.complete or (trig_node is not None and trig_node.complete):
                self.problem(f"event of {label!r} without a trigger")
            return
        event = self.n_events
        self.n_events += 1
        self.res.units.append(Unit("trigger", label, text=trig[0], event=event, end=trig[1], in_schema=known))
        if args_node is None:
            return
        roles = self._roles(label)
        if args_node.kind == "obj":
            for rk, rv in args_node.value:
                if rk.kind != "str":
                    continue
                vals = rv.value if rv.kind == "arr" else [rv]
                for x in vals:
                    whole = _whole(x)
                    if whole:
                        self._arg(label, known, roles, rk.value.value, whole[0], whole[1], event)
                    elif x.kind != "str":
                        self.problem(f"argument of {label!r} that is not a string")
        elif args_node.kind == "arr":
            for x in args_node.value:
                if x.kind != "obj":
                    self.problem(f"argument of {label!r} that is not a {{role, name}} object")
                    continue
                f = {normalize(k.value.value): _whole(v) for k, v in x.value if k.kind == "str"}
                if f.get("role") and f.get("name"):
                    self._arg(label, known, roles, f["role"][0], f["name"][0], max(f["role"][1], f["name"][1]), event)
        elif args_node.kind == "str" and args_node.complete:
            s2 = args_node.value
            for _p, a, b in split_items(s2.value):
                spans = split_role(s2.value, a, b)
                if spans is None:
                    self.problem(f"argument of {label!r} without 'Role:'")
                    continue
                (ra, rb), (xa, xb) = spans
                self._arg(label, known, roles, s2.value[ra:rb], s2.value[xa:xb], s2.raw_end(xb), event)
        else:
            self.problem(f"arguments of {label!r} are not an object")


def units_to_structures(units: list[Unit]) -> dict:
    """Units regrouped as plain structures (no offsets): entities, relations and events with arguments.

    Used to compare a parse with a gold record and to show predictions to people.
    """
    entities = [(u.label, u.text) for u in units if u.kind == "entity"]
    relations = [(u.head, u.label, u.tail) for u in units if u.kind == "relation"]
    events: dict[int, list] = {}
    for u in units:
        if u.kind == "trigger":
            events[u.event] = [u.label, u.text, []]
        elif u.kind == "argument" and u.event in events:
            events[u.event][2].append((u.role, u.text))
    evs = [(t, trig, tuple(sorted(args))) for t, trig, args in events.values()]
    return {"entities": sorted(entities), "relations": sorted(relations), "events": sorted(evs)}
