"""Small builders shared by tests: records of the IE INSTRUCTIONS layout (written by :func:`prouie_pl.reader.write_dataset`)."""

from __future__ import annotations


def ner(sentence: str, *ents: tuple[str, str]) -> dict:
    out = []
    for name, etype in ents:
        start = sentence.index(name)
        out.append({"name": name, "type": etype, "pos": [start, start + len(name)]})
    return {"sentence": sentence, "entities": out}


def rel(sentence: str, *triples: tuple[str, str, str]) -> dict:
    out = []
    for h, r, t in triples:
        hs, ts = sentence.index(h), sentence.index(t)
        out.append({"head": {"name": h, "type": "x", "pos": [hs, hs + len(h)]}, "type": r,
                    "tail": {"name": t, "type": "y", "pos": [ts, ts + len(t)]}})
    return {"sentence": sentence, "relations": out}


def event(sentence: str, etype: str, trigger: str, *args: tuple[str, str]) -> dict:
    ts = sentence.index(trigger)
    arguments = []
    for name, role in args:
        s = sentence.index(name)
        arguments.append({"name": name, "role": role, "pos": [s, s + len(name)]})
    return {"trigger": trigger, "type": etype, "pos": [ts, ts + len(trigger)], "arguments": arguments}
