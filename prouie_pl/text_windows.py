"""Documents of any length cut into windows that fit the model's prompt.

:func:`split_sentences` finds sentence spans with a few rules; :func:`pack_windows` packs consecutive sentences
into windows whose token count stays within a budget (a sentence longer than the budget is cut at whitespace).
Every window keeps its character offsets in the document, so what the model finds in a window can be placed
back in the document.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

# lower-cased words that end with a period without ending a sentence ("Dr. Smith", "e.g. this")
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc e.g i.e cf al fig figs eq no nos vol pp ed eds inc ltd co corp bros "
    "dept univ approx est gen gov col lt sgt capt rev hon jan feb mar apr jun jul aug sep sept oct nov dec".split()
)

_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_WESTERN_END = re.compile(r"(?:[.!?\u2026]+)[\"'\u201d\u2019)\]\u00bb]*(?=\s)")
_CJK_END = re.compile(r"[\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]\u00bb\u300d\u300f]*")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the sentences of ``text``, in order, without surrounding whitespace.

    Rules, in this order:

    * a blank line (a paragraph break) always ends a sentence; single line breaks do not (hard-wrapped text);
    * ``.``, ``!``, ``?`` or ``…`` (a run of them, then any closing quotes or brackets) followed by whitespace ends a
      sentence unless the next visible character is a lower-case letter, or the punctuation is one ``.`` after
      a known abbreviation (:data:`ABBREVIATIONS`: ``Dr.``, ``e.g.``, ``Inc.``), a single letter (the initial in
      ``J. Smith``) or a dotted acronym (``U.S.``);
    * the CJK full stop, exclamation and question marks end a sentence with or without whitespace after them.

    Text without any of these is one sentence; :func:`pack_windows` cuts sentences longer than a window.
    """
    spans: list[tuple[int, int]] = []
    pos = 0
    for m in _PARAGRAPH.finditer(text):
        _split_paragraph(text, pos, m.start(), spans)
        pos = m.end()
    _split_paragraph(text, pos, len(text), spans)
    return spans


def _split_paragraph(text: str, start: int, stop: int, out: list) -> None:
    cuts = []
    for m in _WESTERN_END.finditer(text, start, stop):
        nxt = m.end()
        while nxt < stop and text[nxt].isspace():
            nxt += 1
        if nxt >= stop or text[nxt].islower():
            continue
        if m.group().rstrip("\"'\u201d\u2019)]\u00bb") == "." and _abbreviation_before(text, start, m.start()):
            continue
        cuts.append(m.end())
    for m in _CJK_END.finditer(text, start, stop):
        cuts.append(m.end())
    a = start
    for cut in sorted(set(cuts)) + [stop]:
        _add_stripped(text, a, cut, out)
        a = cut


def _abbreviation_before(text: str, start: int, dot: int) -> bool:
    i = dot
    while i > start and not text[i - 1].isspace():
        i -= 1
    word = text[i:dot].lstrip("(\"'[\u201c\u2018")
    if not word:
        return False
    if len(word) == 1 and word.isalpha():
        return True  # an initial: "J. Smith"
    if "." in word and all(len(part) <= 2 for part in word.split(".")):
        return True  # a dotted acronym or abbreviation: "U.S.", "e.g."
    return word.lower() in ABBREVIATIONS


def _add_stripped(text: str, a: int, b: int, out: list) -> None:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    if b > a:
        out.append((a, b))


# ------------------------------------------------------------------------------------------ windows


@dataclass(frozen=True)
class TextWindow:
    """One piece of a document the model reads at once: ``text == document[start:end]``."""

    start: int
    end: int
    text: str


class TokenCounter:
    """Token counts of character ranges of one document, from one tokenisation of the whole document."""

    def __init__(self, tokenizer, text: str):
        self.text = text
        self._tokenizer = tokenizer
        self.starts: Optional[list[int]] = []
        if text:
            try:
                enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
                self.starts = [a for a, b in enc["offset_mapping"] if b > a]
            except (NotImplementedError, ValueError, TypeError, KeyError):  # a slow tokenizer has no offsets
                self.starts = None

    def count(self, a: int, b: int) -> int:
        if self.starts is None:
            return len(self._tokenizer(self.text[a:b], add_special_tokens=False, verbose=False)["input_ids"])
        return bisect.bisect_left(self.starts, b) - bisect.bisect_left(self.starts, a)

    def token_starts(self, a: int, b: int) -> list[int]:
        """Start offsets of the tokens inside ``[a, b)`` (every character offset when offsets are unknown)."""
        if self.starts is None:
            return list(range(a, b))
        return self.starts[bisect.bisect_left(self.starts, a):bisect.bisect_left(self.starts, b)]


def pack_windows(text: str, budget: int, counter: TokenCounter,
                 sentences: Optional[Sequence[tuple[int, int]]] = None) -> list[TextWindow]:
    """Consecutive sentences packed greedily into windows of at most ``budget`` tokens (as counted in the whole
    document's tokenisation); a sentence longer than ``budget`` becomes several windows cut at whitespace."""
    if budget < 1:
        raise ValueError(f"a window needs room for at least one token, not {budget}")
    sentences = split_sentences(text) if sentences is None else sentences
    pieces: list[tuple[int, int]] = []
    for a, b in sentences:
        if counter.count(a, b) <= budget:
            pieces.append((a, b))
        else:
            pieces.extend(_cut_long(text, a, b, budget, counter))
    windows: list[TextWindow] = []
    cur: Optional[tuple[int, int]] = None
    for a, b in pieces:
        if cur is not None and counter.count(cur[0], b) <= budget:
            cur = (cur[0], b)
            continue
        if cur is not None:
            windows.append(TextWindow(cur[0], cur[1], text[cur[0]:cur[1]]))
        cur = (a, b)
    if cur is not None:
        windows.append(TextWindow(cur[0], cur[1], text[cur[0]:cur[1]]))
    return windows


def _cut_long(text: str, a: int, b: int, budget: int, counter: TokenCounter) -> list[tuple[int, int]]:
    """A span longer than ``budget`` tokens cut into pieces of at most ``budget`` tokens, at the last whitespace
    of each piece when there is one in its second half, else at a token boundary."""
    out: list[tuple[int, int]] = []
    starts = counter.token_starts(a, b)
    i = 0
    cur = a
    while cur < b:
        while i < len(starts) and starts[i] < cur:
            i += 1
        if len(starts) - i <= budget:
            _add_stripped(text, cur, b, out)
            break
        j = i + budget  # the first token that no longer fits
        while j < len(starts) and starts[j] <= cur:
            j += 1  # the bytes of one character can be several tokens that start at the same offset
        limit = starts[j] if j < len(starts) else b
        cut = limit
        ws = max(text.rfind(" ", cur, limit), text.rfind("\n", cur, limit), text.rfind("\t", cur, limit))
        if ws > cur + (limit - cur) // 2:
            cut = ws
        if cut <= cur:
            cut = limit
        _add_stripped(text, cur, cut, out)
        cur = cut
    return out


def split_window(text: str, window: TextWindow) -> list[TextWindow]:
    """A window cut in two near its middle (at a sentence end or whitespace when there is one); used when a
    window's real prompt turns out longer than counted."""
    sents = [(window.start + s, window.start + e) for s, e in split_sentences(window.text)]
    if len(sents) > 1:
        mid = len(sents) // 2
        halves = [(sents[0][0], sents[mid - 1][1]), (sents[mid][0], sents[-1][1])]
    else:
        middle = (window.start + window.end) // 2
        ws = text.rfind(" ", window.start + 1, middle + 1)
        if ws <= window.start:
            ws = text.find(" ", middle, window.end - 1)
        cut = ws if ws > window.start else middle
        if cut <= window.start or cut >= window.end:
            cut = window.start + max(1, (window.end - window.start) // 2)
        halves = [(window.start, cut), (cut, window.end)]
    out = []
    for a, b in halves:
        spans: list = []
        _add_stripped(text, a, b, spans)
        out.extend(TextWindow(s, e, text[s:e]) for s, e in spans)
    return out


def fit_windows(text: str, windows: list[TextWindow], fits: Callable[[TextWindow], bool]) -> list[TextWindow]:
    """Windows re-cut until ``fits`` accepts each one (a single character is always kept)."""
    out: list[TextWindow] = []
    todo = list(reversed(windows))
    while todo:
        w = todo.pop()
        if fits(w) or w.end - w.start <= 1:
            out.append(w)
            continue
        todo.extend(reversed(split_window(text, w)))
    return out
