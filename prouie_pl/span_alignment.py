"""Placing the strings a model wrote back into the text it read.

A model's answer names spans by their text, not their position.  :class:`SpanFinder` looks a string up in one
window: exact occurrences first; when there is none, occurrences that differ only in case and in the amount of
whitespace between words; when there is still none, occurrences that differ in case and whitespace anywhere
(``Smith 's`` for ``Smith's``).  Within a tier, occurrences that start and end on word boundaries are preferred
to ones inside a word (``Ann`` in ``Annual``).  Which occurrence a unit gets:

* entities and triggers: the k-th mention of the same string in an answer takes the k-th occurrence (a model
  lists ``Smith; Smith`` for two mentions), the last one again when the answer lists more than the text has;
* relation heads and tails: the pair of occurrences closest to each other;
* event arguments: the occurrence closest to the event's trigger.

A string found nowhere is not placed (the caller keeps it apart, never drops it).
"""

from __future__ import annotations

import re
from typing import Optional

Span = tuple[int, int]


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


class SpanFinder:
    """Occurrences of strings in one text, cached per string."""

    def __init__(self, text: str):
        self.text = text
        self._cache: dict[str, list[Span]] = {}

    def occurrences(self, span: str) -> list[Span]:
        """Character spans where ``span`` occurs, from the best tier that has any (see the module docstring)."""
        span = span.strip()
        if not span:
            return []
        hit = self._cache.get(span)
        if hit is None:
            hit = self._exact(span) or self._regex(self._spaced(span)) or self._regex(self._anyspace(span))
            hit = self._prefer_boundaries(span, hit)
            self._cache[span] = hit
        return hit

    def _exact(self, span: str) -> list[Span]:
        out, i, text = [], 0, self.text
        while True:
            j = text.find(span, i)
            if j < 0:
                return out
            out.append((j, j + len(span)))
            i = j + 1

    @staticmethod
    def _spaced(span: str) -> str:
        return r"\s+".join(re.escape(w) for w in span.split())

    @staticmethod
    def _anyspace(span: str) -> str:
        return r"\s*".join(re.escape(c) for c in span if not c.isspace())

    def _regex(self, pattern: str) -> list[Span]:
        if not pattern:
            return []
        rx = re.compile(pattern, re.IGNORECASE)
        out, i, text = [], 0, self.text
        while True:
            m = rx.search(text, i)
            if m is None:
                return out
            if m.end() > m.start():
                out.append((m.start(), m.end()))
            i = m.start() + 1

    def _prefer_boundaries(self, span: str, hits: list[Span]) -> list[Span]:
        text = self.text

        def clean(s: Span) -> bool:
            a, b = s
            left = a == 0 or not (_word_char(text[a - 1]) and _word_char(text[a]))
            right = b == len(text) or not (_word_char(text[b - 1]) and _word_char(text[b]))
            return left and right

        good = [s for s in hits if clean(s)]
        return good or hits

    # -------------------------------------------------------------- choosing an occurrence

    def nth(self, span: str, k: int) -> Optional[Span]:
        """The k-th occurrence (0-based), the last one when there are fewer; None when there is none."""
        occ = self.occurrences(span)
        if not occ:
            return None
        return occ[min(k, len(occ) - 1)]

    def nearest(self, span: str, anchor: Span) -> Optional[Span]:
        """The occurrence closest to ``anchor``, one that does not overlap it preferred."""
        occ = self.occurrences(span)
        if not occ:
            return None
        return min(occ, key=lambda s: (_overlaps(s, anchor), _gap(s, anchor), s[0]))

    def pair(self, head: str, tail: str) -> tuple[Optional[Span], Optional[Span]]:
        """Occurrences of ``head`` and ``tail`` closest to each other (not overlapping when possible)."""
        hs, ts = self.occurrences(head), self.occurrences(tail)
        if not hs or not ts:
            return (hs[0] if hs else None), (ts[0] if ts else None)
        best = min(((h, t) for h in hs[:200] for t in ts[:200]), key=lambda p: (_overlaps(*p), _gap(*p), p[0][0], p[1][0]))
        return best


def _overlaps(a: Span, b: Span) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _gap(a: Span, b: Span) -> int:
    return max(0, max(a[0], b[0]) - min(a[1], b[1]))
