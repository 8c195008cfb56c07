"""Token + tag sequences (BIO, BIOES, IO) <-> entities with character offsets.

Classic NER data (CoNLL files, most hub data sets) gives one tag per token.  :func:`tags_to_spans` turns a
tag sequence into token spans under a tagging scheme, :func:`bio_record` turns tokens + tags into an IE
INSTRUCTIONS record whose sentence is the tokens joined by single spaces (the form of every token-level source
in the shared data) and whose entities carry character offsets into it, and :func:`record_to_bio` goes back.

Schemes (aliases in brackets):

* ``BIO`` (IOB2): an entity starts with ``B-T`` and continues with ``I-T``.  Under ``strict`` an ``I-T``
  that does not continue an entity of type ``T`` is an error; without it (IOB1 reading) it starts one.
* ``BIOES`` (IOBES, BILOU with ``L``/``U`` for ``E``/``S``): ``S-T`` is a one-token entity, ``E-T`` ends one.
  Under ``strict`` every entity must be closed by ``E``/``S`` and continue its own type.
* ``IO``: consecutive ``I-T`` (or a bare ``T``) tokens of one type are one entity.

Every problem is one :class:`TagError` line naming the token and the tag.  Tag types become natural-language
labels by ``label_map`` first, then :func:`label_from_tag`'s rule (the shared data's: ``PER`` -> ``person``,
``Work_For`` -> ``work for``, ``creative-work`` -> ``creative work``).
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping, Optional, Sequence

SCHEMES = {"BIO": "BIO", "IOB2": "BIO", "BIOES": "BIOES", "IOBES": "BIOES", "BILOU": "BIOES", "IO": "IO"}
PREFIXES = {"BIO": "BI", "BIOES": "BIES", "IO": "I"}
_BILOU = {"L": "E", "U": "S"}

ABBREVIATIONS = {
    "PER": "person", "PERSON": "person", "ORG": "organization", "LOC": "location", "MISC": "miscellaneous",
    "GPE": "geo-political entity", "FAC": "facility", "NORP": "nationality or religious or political group",
    "DIS": "disease", "CHEM": "chemical",
}


class TagError(ValueError):
    """A tag sequence that the scheme cannot read; the message is one line."""


def check_scheme(scheme: str, option: str = "tag_scheme") -> str:
    key = str(scheme).upper()
    if key not in SCHEMES:
        raise TagError(f"{option} {scheme!r} is not a tagging scheme; choose from {', '.join(SCHEMES)}")
    return SCHEMES[key]


def label_from_tag(tag_type: str, label_map: Optional[Mapping[str, str]] = None) -> str:
    """The natural-language label of a tag type: ``label_map`` if it names it, else the rule (known
    abbreviations, then lower case with ``_``/``-`` as spaces)."""
    if label_map and tag_type in label_map:
        return label_map[tag_type]
    if tag_type.upper() in ABBREVIATIONS:
        return ABBREVIATIONS[tag_type.upper()]
    return re.sub(r"[_\-\s]+", " ", tag_type).strip().lower()


def split_tag(tag: str, scheme: str, position: int) -> tuple[str, str]:
    """``(prefix, type)`` of one tag: ``("O", "")`` for outside, else a prefix of the scheme and a type."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep:
        prefix, sep, kind = tag.partition("_") if tag[:2] in ("B_", "I_", "E_", "S_", "L_", "U_") else ("", "", tag)
    if scheme == "BIOES":
        prefix = _BILOU.get(prefix, prefix)
    if scheme == "IO" and not prefix and kind:
        prefix = "I"  # IO data often writes the bare type
    if prefix not in PREFIXES[scheme] or not kind:
        allowed = ", ".join(f"{p}-TYPE" for p in PREFIXES[scheme])
        raise TagError(f"token {position}: unknown tag {tag!r} for the {scheme} scheme (expected O or {allowed})")
    return prefix, kind


def tags_to_spans(tags: Sequence[str], scheme: str = "BIO", strict: bool = True) -> list[tuple[int, int, str]]:
    """Entities of a tag sequence as ``(first token, last token + 1, type)``, in order."""
    scheme = check_scheme(scheme)
    spans: list[tuple[int, int, str]] = []
    start, kind, closed = None, "", True  # the open entity; closed: BIOES saw its E/S

    def close(at: int, why: str) -> None:
        nonlocal start, kind, closed
        if start is not None:
            if strict and scheme == "BIOES" and not closed:
                raise TagError(f"token {at}: {why} while the {kind} entity from token {start} is not closed by E- (strict BIOES)")
            spans.append((start, at, kind))
        start, kind, closed = None, "", True

    for i, tag in enumerate(tags):
        prefix, t = split_tag(tag, scheme, i)
        previous = tags[i - 1] if i else "the start"
        if prefix == "O":
            close(i, "O")
        elif prefix == "B" or prefix == "S":
            close(i, f"{tag!r} begins a new entity")
            start, kind, closed = i, t, prefix == "S"
            if prefix == "S":
                close(i + 1, "")
        else:  # I or E
            continues = start is not None and kind == t and (scheme != "BIOES" or not closed)
            if not continues:
                if strict and scheme != "IO":
                    raise TagError(f"token {i}: tag {tag!r} follows {previous!r} (strict {scheme}: an entity starts with "
                                   f"{'B-' if scheme == 'BIO' else 'B- or S-'}{t})")
                close(i, f"{tag!r} begins a new entity")
                start, kind, closed = i, t, scheme != "BIOES"
            if prefix == "E":
                closed = True
                close(i + 1, "")
            elif scheme == "BIOES":
                closed = False
    close(len(tags), "the sentence ends")
    return spans


def spans_to_tags(n_tokens: int, spans: Sequence[tuple[int, int, str]], scheme: str = "BIO") -> list[str]:
    """Tags of ``n_tokens`` tokens with entities ``spans`` (non-overlapping, ``(first, last + 1, type)``)."""
    scheme = check_scheme(scheme)
    tags = ["O"] * n_tokens
    for a, b, t in sorted(spans):
        if not 0 <= a < b <= n_tokens:
            raise TagError(f"entity span {(a, b)} lies outside the {n_tokens} tokens")
        if any(tag != "O" for tag in tags[a:b]):
            raise TagError(f"entity {t!r} at tokens {a}-{b - 1} overlaps another entity; one tag per token cannot hold both")
        if scheme == "IO":
            tags[a:b] = [f"I-{t}"] * (b - a)
        elif scheme == "BIO":
            tags[a:b] = [f"B-{t}"] + [f"I-{t}"] * (b - a - 1)
        else:
            tags[a:b] = [f"S-{t}"] if b - a == 1 else [f"B-{t}"] + [f"I-{t}"] * (b - a - 2) + [f"E-{t}"]
    return tags


def token_offsets(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """Character span of each token in ``" ".join(tokens)``."""
    out, at = [], 0
    for tok in tokens:
        out.append((at, at + len(tok)))
        at += len(tok) + 1
    return out


def bio_record(tokens: Sequence[str], tags: Sequence[str], scheme: str = "BIO", strict: bool = True,
               label_map: Optional[Mapping[str, str]] = None) -> dict:
    """An IE INSTRUCTIONS NER record (``{"sentence", "entities"}``) from tokens and their tags."""
    if len(tokens) != len(tags):
        raise TagError(f"{len(tokens)} tokens but {len(tags)} tags")
    bad = next((i for i, t in enumerate(tokens) if not t or any(c.isspace() for c in t)), None)
    if bad is not None:
        raise TagError(f"token {bad} {tokens[bad]!r} is empty or holds white space, so the sentence cannot be split back into tokens")
    offsets = token_offsets(tokens)
    sentence = " ".join(tokens)
    entities = []
    for a, b, t in tags_to_spans(tags, scheme, strict):
        s, e = offsets[a][0], offsets[b - 1][1]
        entities.append({"name": sentence[s:e], "type": label_from_tag(t, label_map), "pos": [s, e]})
    return {"sentence": sentence, "entities": entities}


def record_to_bio(sentence: str, entities: Sequence, scheme: str = "BIO") -> tuple[list[str], list[str]]:
    """Tokens (the sentence split at single spaces) and tags of a record's entities (``Entity`` objects or
    IE INSTRUCTIONS dicts with ``pos``).  Tag types are the labels with spaces as underscores; an entity whose
    offsets do not fall on token boundaries, or that overlaps another, raises :class:`TagError`."""
    tokens = sentence.split(" ")
    offsets = token_offsets(tokens)
    starts = {s: i for i, (s, _) in enumerate(offsets)}
    ends = {e: i for i, (_, e) in enumerate(offsets)}
    spans = []
    for ent in entities:
        name, label, pos = (ent["name"], ent["type"], ent.get("pos")) if isinstance(ent, dict) else (ent.name, ent.type, ent.pos)
        if pos is None:
            raise TagError(f"entity {name!r} has no character offsets")
        s, e = pos
        if s not in starts or e not in ends or ends[e] < starts[s]:
            raise TagError(f"entity {name!r} at characters {s}-{e} does not start and end on token boundaries")
        spans.append((starts[s], ends[e] + 1, label.replace(" ", "_")))
    return tokens, spans_to_tags(len(tokens), spans, scheme)


def read_conll(path, token_column: int = 0, tag_column: int = -1) -> Iterator[tuple[int, list[str], list[str], Optional[str]]]:
    """``(line number of the sentence's first token, tokens, tags, problem)`` per sentence of a CoNLL / BIO
    file: one token per line in white-space separated columns, blank lines between sentences, ``-DOCSTART-``
    lines skipped.  ``problem`` is None, or one line naming a line of the file that lacks the token or the tag
    column (the sentence is kept whole so it can be reported and skipped as one record)."""
    tokens: list[str] = []
    tags: list[str] = []
    first, problem = 0, None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            cols = line.split()
            if not cols or cols[0] == "-DOCSTART-":
                if tokens or problem:
                    yield first, tokens, tags, problem
                tokens, tags, problem = [], [], None
                continue
            if not tokens and problem is None:
                first = number
            try:
                if len(cols) < 2:
                    raise IndexError
                token, tag = cols[token_column], cols[tag_column]
            except IndexError:
                problem = problem or (f"line {number}: {line.rstrip()!r} has {len(cols)} column(s); a token line needs "
                                      f"the token (column {token_column}) and the tag (column {tag_column})")
                continue
            tokens.append(token)
            tags.append(tag)
    if tokens or problem:
        yield first, tokens, tags, problem
