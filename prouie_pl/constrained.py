"""Schema-constrained decoding of the concise format: a ``LogitsProcessor`` that lets through only tokens that
keep the answer a valid concise-format object whose keys come from the schema and whose spans are copied from
the text.

What the automaton accepts (exactly what :func:`prouie_pl.formats.render_target` writes for values the compact
syntax carries, and what :func:`prouie_pl.parser.parse_output` reads back with ``ok=True``)::

    answer  = "{}" | "{" pair (", " pair)* "}"            then one stop token
    pair    = '"' KEY '": ' value                          each key at most once
    NER     = '"' SPAN ("; " SPAN)* '"'
    RE      = '"' HEAD " -> " TAIL ("; " HEAD " -> " TAIL)* '"'
    EE      = event | "[" event (", " event)* "]"
    event   = '"' TRIGGER (": " ROLE ": " ARG ("; " ROLE ": " ARG)*)? '"'     ROLE from the key's event type

KEY is a schema label and ROLE one of the event type's roles as the format writes them (``Subject``), both
JSON-escaped.  A SPAN (and HEAD, TAIL, TRIGGER, ARG) is a substring of the row's text that starts with a
character other than whitespace and holds none of ``"``, ``\\``, ``;`` or control characters (the compact syntax
cannot carry them unescaped); a HEAD holds no ``>`` (so never ``->``) and a TRIGGER no ``:``.

How it runs:

* :class:`TokenTable` (once per tokenizer): the UTF-8 bytes each token contributes to the decoded text, a map
  from byte string to token ids and the set of every prefix of every token.  The automaton works on bytes, so
  byte-fallback and byte-level tokens, and tokens that straddle a structure/span boundary (``",`` after a
  name, `` Mary`` after ``;``), are handled like any other.
* :class:`Grammar` (once per task and schema): the structure above as a byte automaton whose span slots are
  special nodes; for each node its distance (in bytes, a span counting one) to the end.
* per row (built when decoding starts): the text's bytes, where spans may start, and a memo of allowed tokens
  per automaton state.  A state is a small set of configurations ``(node, positions, used keys)``; inside a
  span, ``positions`` are the text offsets where the span written so far may end (every occurrence is
  tracked, so any substring can be continued).
* per step: move each row's state by the bytes of the token just chosen, then list the allowed tokens by
  walking the automaton and the token-prefix set together (structure states come from the memo; inside a span
  the walk follows the text from the tracked positions), and set every other logit to -inf for the whole
  batch at once (one fill and one indexed copy).
* budget: near ``max_new_tokens`` no token may open more than the tokens left can close (a key is not begun
  that cannot be finished), and once they are barely enough only tokens on a shortest way to the end are
  allowed, so an answer is never cut by the limit.

A row the automaton cannot follow (a token chosen that it did not allow, say by another processor) is left
unconstrained from then on rather than stopping the batch.
"""

from __future__ import annotations

import heapq
import json
import re
import weakref
from typing import Optional, Sequence

import numpy as np
import torch

from .formats import role_display
from .schema import LabelSchema

# span kinds and the bytes each may not contain
NAME, HEAD, TAIL, TRIGGER, ARG = range(5)
_COMMON_BARRIER = set(b'"\\;') | set(range(32)) | {127}
_EXTRA_BARRIER = {HEAD: set(b">"), TRIGGER: set(b":")}
BARRIERS: tuple[bytes, ...] = tuple(
    bytes(1 if (b in _COMMON_BARRIER or b in _EXTRA_BARRIER.get(kind, ())) else 0 for b in range(256)) for kind in range(5)
)
TASK_KINDS = {"NER": (NAME,), "RE": (HEAD, TAIL), "EE": (TRIGGER, ARG)}

SPAN_COST = 1
CLOSING_SLACK = 6  # extra steps kept for closing: a multi-byte character written as byte tokens, the stop token
_INF = 1 << 30


# ------------------------------------------------------------------------------------------ token bytes


def _byte_level_decoder() -> dict[str, int]:
    """The reverse of the byte-to-printable-character map of byte-level BPE (GPT-2 style)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_byte_strings(tokenizer) -> list[Optional[bytes]]:
    """What each token id adds to the decoded text, as UTF-8 bytes; None for special tokens and the unknown.

    Byte-level BPE tokens map back through the byte alphabet; SentencePiece-style tokens through the
    decoder's ``Replace`` rules (``▁`` -> space) and ``<0xNN>`` byte fallback; anything else through the
    tokenizer's own ``convert_tokens_to_string`` (tokens that then decode to U+FFFD are left out).
    """
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    decoder: dict = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            decoder = json.loads(backend.to_str()).get("decoder") or {}
        except Exception:  # an exotic backend: fall back to the tokenizer's own conversion
            decoder = {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {p.get("type") for p in parts if isinstance(p, dict)}
    out: list[Optional[bytes]] = [None] * n
    if "ByteLevel" in types:
        table = _byte_level_decoder()
        for i, piece in enumerate(pieces):
            if i in special or piece is None:
                continue
            try:
                out[i] = bytes(table[c] for c in piece)
            except KeyError:
                out[i] = None
        return out
    replaces = []
    for p in parts:
        if isinstance(p, dict) and p.get("type") == "Replace":
            pat = p.get("pattern", {})
            if "String" in pat:
                replaces.append((pat["String"], p.get("content", "")))
    byte_fallback = "ByteFallback" in types
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            continue
        m = _BYTE_TOKEN.fullmatch(piece) if byte_fallback else None
        if m:
            out[i] = bytes([int(m.group(1), 16)])
            continue
        if replaces:
            text = piece
            for a, b in replaces:
                text = text.replace(a, b)
        else:
            text = tokenizer.convert_tokens_to_string([piece])
        if "\ufffd" in text:
            continue
        out[i] = text.encode("utf-8")
    return out


class TokenTable:
    """The vocabulary as byte strings, for walking the automaton: ids per byte string and all token prefixes."""

    def __init__(self, tokenizer):
        self.bytes_of = token_byte_strings(tokenizer)
        self.ids_of: dict[bytes, list[int]] = {}
        self.prefixes: set[bytes] = set()
        for i, bs in enumerate(self.bytes_of):
            if not bs:
                continue
            self.ids_of.setdefault(bs, []).append(i)
            for k in range(1, len(bs) + 1):
                self.prefixes.add(bs[:k])
        self.size = len(self.bytes_of)


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_table(tokenizer) -> TokenTable:
    """The :class:`TokenTable` of a tokenizer, built once per tokenizer object."""
    table = _TABLES.get(tokenizer)
    if table is None:
        table = TokenTable(tokenizer)
        _TABLES[tokenizer] = table
    return table


# ------------------------------------------------------------------------------------------ grammar


def _escaped(text: str) -> bytes:
    """A label or role as it stands inside a JSON string of the rendered answer."""
    return json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8")


class Grammar:
    """The concise format of one task and schema as a byte automaton (see the module docstring).

    ``trans[node]`` maps a byte to ``(next node, key index or -1)``; the key index marks the byte that completes
    a key (so the key is used up).  ``span[node]`` is ``(kind, node after the span)`` for span slots.
    ``key_mask[node]`` is the bit set of keys a key-trie node still leads to.
    """

    def __init__(self, task: str, schema: LabelSchema):
        if task not in TASK_KINDS:
            raise ValueError(f"constrained decoding knows the tasks NER, RE and EE, not {task!r}")
        self.task = task
        self.schema = schema
        self.trans: list[dict[int, tuple[int, int]]] = []
        self.span: list[Optional[tuple[int, int]]] = []
        self.key_mask: list[int] = []
        self.keys = list(schema.labels)
        self.start = self._node()
        self.end = self._node()
        opened = self._chain(self.start, b"{")
        self._edge(opened, ord("}"), self.end)
        key_root = self._node()
        self._edge(opened, ord('"'), key_root)
        self.next_pair = self._node()
        self._edge(self.next_pair, ord("}"), self.end)
        comma, space = self._node(), self._node()
        self._edge(self.next_pair, ord(","), comma)
        self._edge(comma, ord(" "), space)
        self._edge(space, ord('"'), key_root)
        # another pair only while a key is left: these nodes lead to every key
        every_key = (1 << len(schema.labels)) - 1
        for node in (comma, space, key_root):
            self.key_mask[node] = every_key
        shared_value = None
        for k, label in enumerate(self.keys):
            if task == "EE":
                value = self._node()
                self._event_value(value, schema.roles.get(label, ()))
            else:
                if shared_value is None:
                    shared_value = self._node()
                    (self._ner_value if task == "NER" else self._re_value)(shared_value)
                value = shared_value
            path = self._trie_path(key_root, _escaped(label))
            for nxt in path:
                self.key_mask[nxt] |= 1 << k
            node = path[-1] if path else key_root
            colon = self._node()
            self._edge(node, ord('"'), colon, key=k)
            self._chain(colon, b": ", value)
        self._dist_cache: dict[int, list[int]] = {}

    # -------------------------------------------------------------- building

    def _node(self, span: Optional[tuple[int, int]] = None) -> int:
        self.trans.append({})
        self.span.append(span)
        self.key_mask.append(0)
        return len(self.trans) - 1

    def _edge(self, a: int, byte: int, b: int, key: int = -1) -> None:
        if byte in self.trans[a] and self.trans[a][byte] != (b, key):
            raise ValueError(f"ambiguous concise-format automaton at byte {chr(byte)!r}")
        self.trans[a][byte] = (b, key)

    def _trie_path(self, node: int, data: bytes) -> list[int]:
        """The nodes spelling ``data`` from ``node``, sharing existing edges and adding the missing ones."""
        path = []
        for byte in data:
            hit = self.trans[node].get(byte)
            if hit is None:
                nxt = self._node()
                self._edge(node, byte, nxt)
            else:
                nxt = hit[0]
            path.append(nxt)
            node = nxt
        return path

    def _chain(self, a: int, data: bytes, end: Optional[int] = None) -> int:
        """Nodes spelling ``data`` from ``a``; the last byte leads to ``end`` (a new node when None)."""
        for i, byte in enumerate(data):
            nxt = end if (i == len(data) - 1 and end is not None) else self._node()
            self._edge(a, byte, nxt)
            a = nxt
        return a

    def _span(self, kind: int, after: int) -> int:
        return self._node(span=(kind, after))

    def _ner_value(self, value: int) -> None:
        after = self._node()
        name = self._span(NAME, after)
        self._edge(value, ord('"'), name)
        self._chain(after, b"; ", name)
        self._edge(after, ord('"'), self.next_pair)

    def _re_value(self, value: int) -> None:
        head_end, tail_end = self._node(), self._node()
        head, tail = self._span(HEAD, head_end), self._span(TAIL, tail_end)
        self._edge(value, ord('"'), head)
        self._chain(head_end, b" -> ", tail)
        self._chain(tail_end, b"; ", head)
        self._edge(tail_end, ord('"'), self.next_pair)

    def _event_value(self, value: int, roles: Sequence[str]) -> None:
        # roles the compact syntax cannot carry are left out (the schema loader rejects them anyway)
        shown = [role_display(r) for r in roles if not set(r) & set(':;"\\') and r.strip()]
        self._edge(value, ord('"'), self._event_body(shown, self.next_pair))
        in_list = self._chain(value, b"[")
        list_next = self._node()
        body = self._event_body(shown, list_next)
        self._edge(in_list, ord('"'), body)
        self._chain(list_next, b', "', body)
        self._edge(list_next, ord("]"), self.next_pair)

    def _event_body(self, roles: Sequence[str], after_close: int) -> int:
        trig_end = self._node()
        trigger = self._span(TRIGGER, trig_end)
        self._edge(trig_end, ord('"'), after_close)
        if roles:
            role_root = self._node()
            self._chain(trig_end, b": ", role_root)
            arg_end = self._node()
            arg = self._span(ARG, arg_end)
            for role in dict.fromkeys(roles):
                path = self._trie_path(role_root, _escaped(role))
                self._chain(path[-1] if path else role_root, b": ", arg)
            self._chain(arg_end, b"; ", role_root)
            self._edge(arg_end, ord('"'), after_close)
        return trigger

    # -------------------------------------------------------------- distances

    def dist(self, kinds_available: int) -> list[int]:
        """Bytes (a span counting ``SPAN_COST``) from each node to the end, using only span kinds whose bit is
        set in ``kinds_available``; ``_INF`` where the end cannot be reached."""
        hit = self._dist_cache.get(kinds_available)
        if hit is not None:
            return hit
        n = len(self.trans)
        back: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        for a in range(n):
            for nxt, _key in self.trans[a].values():
                back[nxt].append((a, 1))
            sp = self.span[a]
            if sp is not None and kinds_available >> sp[0] & 1:
                back[sp[1]].append((a, SPAN_COST))
        dist = [_INF] * n
        dist[self.end] = 0
        heap = [(0, self.end)]
        while heap:
            d, v = heapq.heappop(heap)
            if d > dist[v]:
                continue
            for u, w in back[v]:
                if d + w < dist[u]:
                    dist[u] = d + w
                    heapq.heappush(heap, (d + w, u))
        self._dist_cache[kinds_available] = dist
        return dist


_GRAMMARS: dict = {}


def grammar_for(task: str, schema: LabelSchema) -> Grammar:
    key = (task, schema)
    g = _GRAMMARS.get(key)
    if g is None:
        if len(_GRAMMARS) > 256:
            _GRAMMARS.clear()
        g = _GRAMMARS[key] = Grammar(task, schema)
    return g


# ------------------------------------------------------------------------------------------ one row


class RowAutomaton:
    """The constraint of one row: its grammar, its text, its current state and its memo of allowed tokens."""

    def __init__(self, grammar: Grammar, text: str, table: TokenTable, stop_ids: Sequence[int]):
        self.g = grammar
        self.table = table
        self.stop_ids = list(stop_ids)
        self.stop_set = set(stop_ids)
        self.stop_array = np.asarray(self.stop_ids, dtype=np.int64)
        tb = text.encode("utf-8")
        self.tb = tb
        self.n = len(tb)
        boundary = bytearray(self.n + 1)
        space_at = bytearray(self.n + 1)
        pos = 0
        for ch in text:
            boundary[pos] = 1
            space_at[pos] = 1 if ch.isspace() else 0
            pos += len(ch.encode("utf-8"))
        boundary[self.n] = 1
        self.boundary = boundary
        self._space_at = space_at
        self.starts: dict[int, list[int]] = {}
        self._starts_by_byte: dict[int, dict[int, list[int]]] = {}
        avail = 0
        for kind in range(5):
            bar = BARRIERS[kind]
            starts = [p for p in range(self.n) if boundary[p] and not space_at[p] and not bar[tb[p]]]
            self.starts[kind] = starts
            if starts:
                avail |= 1 << kind
        self.dist = grammar.dist(avail)
        self.max_dist = max(d for d in self.dist if d < _INF) + 1  # no state is farther from the end than this
        self.configs: list[tuple] = [(grammar.start, None, 0)] if self.dist[grammar.start] < _INF else []
        self.done = False
        self.free = False  # left unconstrained after an unexpected token
        self.memo: dict = {}

    # -------------------------------------------------------------- moving

    def _starts_with(self, kind: int, byte: int) -> list[int]:
        table = self._starts_by_byte.get(kind)
        if table is None:
            table = {}
            for p in self.starts[kind]:
                table.setdefault(self.tb[p], []).append(p)
            self._starts_by_byte[kind] = table
        return table.get(byte, [])

    def _edge_ok(self, nxt: int, key: int, used: int) -> bool:
        if self.dist[nxt] >= _INF:
            return False
        if key >= 0 and used >> key & 1:
            return False
        mask = self.g.key_mask[nxt]
        return not mask or bool(mask & ~used)

    def _struct_step(self, node: int, byte: int, used: int, out: list) -> None:
        edge = self.g.trans[node].get(byte)
        if edge is None:
            return
        nxt, key = edge
        if not self._edge_ok(nxt, key, used):
            return
        out.append((nxt, None, used | (1 << key) if key >= 0 else used))

    def _endable(self, positions) -> bool:
        b = self.boundary
        return any(b[p] for p in positions)

    def _moved(self, configs: list, bs: bytes) -> list:
        """The configurations after reading the bytes ``bs`` (empty when the automaton cannot read them)."""
        tb, n = self.tb, self.n
        for byte in bs:
            new: list = []
            for node, pos, used in configs:
                sp = self.g.span[node]
                if sp is None:
                    self._struct_step(node, byte, used, new)
                    continue
                kind, after = sp
                if pos is None:
                    q = tuple(p + 1 for p in self._starts_with(kind, byte))
                    if q:
                        new.append((node, q, used))
                    continue
                if not BARRIERS[kind][byte]:
                    q = tuple(p + 1 for p in pos if p < n and tb[p] == byte)
                    if q:
                        new.append((node, q, used))
                if self._endable(pos):
                    self._struct_step(after, byte, used, new)
            configs = list(dict.fromkeys(new))
            if not configs:
                break
        return configs

    def advance(self, token_id: int) -> None:
        """Move the state by the bytes of the token that was chosen."""
        if self.done or self.free:
            return
        if token_id in self.stop_set:
            self.done = True
            return
        bs = self.table.bytes_of[token_id] if 0 <= token_id < self.table.size else None
        configs = self._moved(self.configs, bs) if bs else []
        if not configs:
            self.free = True  # not a token this automaton allowed: leave the row alone from here on
        self.configs = configs

    def within_budget(self, ids: np.ndarray, limit: int) -> np.ndarray:
        """The tokens of ``ids`` after which the answer can still be closed in ``limit`` bytes (a span counting
        one): near the token limit, a token must not open more than the tokens left can close."""
        keep = []
        for tid in np.unique(ids).tolist():
            if tid in self.stop_set:
                keep.append(tid)
                continue
            bs = self.table.bytes_of[tid]
            after = self._moved(self.configs, bs) if bs else []
            if after and min(self._config_dist(c) for c in after) <= limit:
                keep.append(tid)
        return np.asarray(keep, dtype=np.int64)

    # -------------------------------------------------------------- allowed tokens

    def _config_dist(self, cfg) -> int:
        node, pos, _used = cfg
        sp = self.g.span[node]
        if sp is None or pos is None:
            return self.dist[node]
        return self.dist[sp[1]] + (0 if self._endable(pos) else 1)

    def remaining(self) -> int:
        """Bytes still needed to close the answer (a span counting one), plus nothing for the stop token."""
        return min((self._config_dist(c) for c in self.configs), default=0)

    def allowed(self, closing: bool) -> np.ndarray:
        """Token ids allowed next (ids may repeat)."""
        configs = self.configs
        if closing and len(configs) > 1:
            best = self.remaining()
            configs = [c for c in configs if self._config_dist(c) == best]
        chunks: list[np.ndarray] = []
        fresh: list[int] = []
        for cfg in configs:
            node, pos, used = cfg
            if node == self.g.end:
                chunks.append(self.stop_array)
            elif pos is None:
                chunks.append(self._memo_state(node, used, closing))
            else:
                self._explore_span(b"", node, pos, used, closing, fresh, set(), chunks)
        if fresh:
            chunks.append(np.asarray(fresh, dtype=np.int64))
        if not chunks:
            return self.stop_array[:0]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def _memo_state(self, node: int, used: int, closing: bool) -> np.ndarray:
        """Allowed tokens from a state outside a span or at a span's start: the same every time, so kept."""
        key = (node, used, closing)
        hit = self.memo.get(key)
        if hit is None:
            ids: list[int] = []
            seen: set = set()
            if self.g.span[node] is None:
                self._explore_struct(b"", node, used, closing, ids, seen)
            else:
                self._explore_span(b"", node, None, used, closing, ids, seen, None)
            hit = self.memo[key] = np.asarray(ids, dtype=np.int64)
        return hit

    def _explore_struct(self, prefix: bytes, node: int, used: int, closing: bool, out: list, seen: set) -> None:
        trans = self.g.trans[node]
        if not trans:
            return
        edges = [(b, nxt, key) for b, (nxt, key) in trans.items() if self._edge_ok(nxt, key, used)]
        if closing and edges:
            best = min(self.dist[nxt] for _b, nxt, _k in edges)
            edges = [e for e in edges if self.dist[e[1]] == best]
        prefixes, ids_of = self.table.prefixes, self.table.ids_of
        for byte, nxt, key in edges:
            s = prefix + bytes((byte,))
            if s not in prefixes:
                continue
            ids = ids_of.get(s)
            if ids:
                out.extend(ids)
            if nxt == self.g.end:
                continue  # nothing may follow the closing brace inside the same token
            used2 = used | (1 << key) if key >= 0 else used
            if self.g.span[nxt] is None:
                self._explore_struct(s, nxt, used2, closing, out, seen)
            else:
                self._explore_span(s, nxt, None, used2, closing, out, seen, None)

    def _explore_span(self, prefix: bytes, node: int, pos, used: int, closing: bool, out: list, seen: set,
                      chunks: Optional[list]) -> None:
        kind, after = self.g.span[node]
        if pos is None:
            starts = self.starts[kind]
        else:
            if self._endable(pos):
                if prefix:
                    self._end_span(prefix, after, used, closing, out, seen)
                elif chunks is not None:
                    chunks.append(self._memo_state(after, used, closing))
                else:
                    out.extend(self._memo_state(after, used, closing).tolist())
                if closing:
                    return  # closing: end the span now rather than make it longer
            starts = pos
        tb, n, boundary = self.tb, self.n, self.boundary
        bar = BARRIERS[kind]
        prefixes, ids_of = self.table.prefixes, self.table.ids_of
        for p in starts:
            for q in range(p, n):
                if bar[tb[q]]:
                    break
                s = prefix + tb[p:q + 1]
                if s not in prefixes:
                    break
                ids = ids_of.get(s)
                if ids:
                    out.extend(ids)
                if boundary[q + 1]:
                    self._end_span(s, after, used, closing, out, seen)

    def _end_span(self, s: bytes, after: int, used: int, closing: bool, out: list, seen: set) -> None:
        """Tokens that end the span inside themselves (``s`` so far) and go on with the structure after it."""
        if (s, after) in seen:
            return
        seen.add((s, after))
        prefixes = self.table.prefixes
        if any(s + bytes((b,)) in prefixes for b in self.g.trans[after]):
            self._explore_struct(s, after, used, closing, out, seen)


# ------------------------------------------------------------------------------------------ the processor


class SchemaConstrainedLogits:
    """A transformers logits processor that masks every token the concise-format automaton does not allow.

    Args:
        tokenizer: the model's tokenizer (its :class:`TokenTable` is built once and cached).
        rows: ``(task, schema, text)`` per batch row, in batch order.
        prompt_width: width of the (left-padded) prompt batch handed to ``generate``.
        max_new_tokens: the generation limit; answers are closed before it.
        stop_ids: ids that end generation (:func:`prouie_pl.chat.stop_token_ids`).
    """

    def __init__(self, tokenizer, rows: Sequence[tuple[str, LabelSchema, str]], prompt_width: int, max_new_tokens: int,
                 stop_ids: Sequence[int]):
        table = token_table(tokenizer)
        self.rows = [RowAutomaton(grammar_for(task, schema), text, table, stop_ids) for task, schema, text in rows]
        self.prompt_width = prompt_width
        self.max_new_tokens = max_new_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width
        if step > 0:
            last = input_ids[:, -1].tolist()
            for row, tok in zip(self.rows, last):
                row.advance(tok)
        left = self.max_new_tokens - step
        row_idx: list[np.ndarray] = []
        col_idx: list[np.ndarray] = []
        open_rows = []
        vocab = scores.shape[1]
        for i, row in enumerate(self.rows):
            if row.done or row.free:
                continue
            closing = left <= row.remaining() + CLOSING_SLACK
            cols = row.allowed(closing)
            if not closing and left <= row.max_dist + CLOSING_SLACK:
                # near the limit: no token that opens more than the steps left can close
                cols = row.within_budget(cols, left - 1 - CLOSING_SLACK)
                if not len(cols):
                    cols = row.allowed(True)
            if not len(cols):  # nothing the automaton can say: end the answer here
                cols = row.stop_array
            cols = cols[cols < vocab] if vocab < row.table.size else cols
            open_rows.append(i)
            row_idx.append(np.full(len(cols), i, dtype=np.int64))
            col_idx.append(cols)
        if not open_rows:
            return scores
        # one pass over the logits: start from -inf and copy back the allowed entries (and the rows left alone)
        out = torch.full_like(scores, float("-inf"))
        r = torch.from_numpy(np.concatenate(row_idx)).to(scores.device, non_blocking=True)
        c = torch.from_numpy(np.concatenate(col_idx)).to(scores.device, non_blocking=True)
        out[r, c] = scores[r, c]
        if len(open_rows) < len(self.rows):
            shut = set(range(len(self.rows))) - set(open_rows)
            closed = torch.as_tensor(sorted(shut), device=scores.device)
            out[closed] = scores[closed]
        return out
