"""The embedded demo data set: small NER, RE and EE data sets in the IE INSTRUCTIONS layout.

The JSON files beside this module were written by :func:`generate` (``python -m prouie_pl demo-data --out
DIR`` writes them anywhere); a test checks that the shipped files are exactly what the generator makes with
the default seed.  The records are synthetic sentences about a small invented world: people, companies,
cities and countries, filled into templates and annotated with exact character offsets.  Names are drawn
from pools shared by all splits, but the combinations differ, so test sentences are new sentences, not copies.

What the data is for: showing the three-stage pipeline end to end on a CPU in minutes.  What it is not:
a benchmark.  Its sentences are far more regular than real text, so its scores say nothing about real data.
For real sentences, ``real/`` beside it holds small seeded subsets of three public benchmarks whose licences
allow redistribution (:mod:`prouie_pl.demo_data.real`, ``data_dir: demo_real``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from ..reader import write_dataset

DEMO_SIZES = {"train": 240, "dev": 40, "test": 40}
DEFAULT_SEED = 20240607

FIRST = ["Anna", "Ben", "Clara", "David", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wes", "Yara"]
LAST = ["Adams", "Berg", "Costa", "Diaz", "Evans", "Fischer", "Garcia", "Horn", "Ito", "Jensen", "Klein",
        "Lopez", "Meyer", "Novak", "Olsen", "Park", "Reyes", "Silva", "Torres", "Weber"]
ORGS = ["Acme Corp", "Blue Harbor Bank", "Cedar Labs", "Delta Motors", "Echo Media", "Falcon Air",
        "Green Valley Farms", "Helix Biotech", "Iron Bridge Group", "Juniper Systems", "Kite Foods",
        "Lumen Energy", "Maple Press", "Nova Robotics", "Orbit Telecom", "Pine Street Capital"]
CITIES = ["Lisbon", "Oslo", "Kyoto", "Denver", "Nairobi", "Porto", "Dublin", "Austin", "Lyon", "Krakow",
          "Quito", "Perth", "Turin", "Bergen", "Osaka", "Seville"]
COUNTRY_OF = {"Lisbon": "Portugal", "Oslo": "Norway", "Kyoto": "Japan", "Denver": "USA", "Nairobi": "Kenya",
              "Porto": "Portugal", "Dublin": "Ireland", "Austin": "USA", "Lyon": "France", "Krakow": "Poland",
              "Quito": "Ecuador", "Perth": "Australia", "Turin": "Italy", "Bergen": "Norway", "Osaka": "Japan",
              "Seville": "Spain"}
DAYS = ["Monday", "Tuesday", "Friday", "last week", "in March", "in 2021", "yesterday"]

NER_LABELS = ["person", "organization", "location"]
RE_LABELS = ["work for", "live in", "located in", "based in"]
EE_LABELS = {
    "hire": ["employer", "employee", "place"],
    "travel": ["traveler", "destination", "time"],
    "acquire": ["buyer", "target", "price"],
}


class _Sentence:
    """Builds a sentence piece by piece and records the character span of every slot."""

    def __init__(self):
        self.parts: list[str] = []
        self.length = 0

    def add(self, text: str) -> tuple[int, int]:
        if self.parts and not text.startswith((" ", ",", ".")):
            self.parts.append(" ")
            self.length += 1
        start = self.length
        self.parts.append(text)
        self.length += len(text)
        return (start + (1 if text.startswith(" ") else 0), self.length)

    def text(self) -> str:
        return "".join(self.parts)


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _ent(name: str, etype: str, span) -> dict:
    return {"name": name, "type": etype, "pos": list(span)}


def _ner_record(rng: random.Random) -> dict:
    s = _Sentence()
    ents = []
    kind = rng.randrange(6)
    p, o, c = _person(rng), rng.choice(ORGS), rng.choice(CITIES)
    if kind == 0:
        ents.append(_ent(p, "person", s.add(p))); s.add("joined"); ents.append(_ent(o, "organization", s.add(o)))
        s.add("in"); ents.append(_ent(c, "location", s.add(c))); s.add(".")
    elif kind == 1:
        s.add("The office of"); ents.append(_ent(o, "organization", s.add(o))); s.add("in")
        ents.append(_ent(c, "location", s.add(c))); s.add("opened"); s.add(rng.choice(DAYS)); s.add(".")
    elif kind == 2:
        ents.append(_ent(p, "person", s.add(p))); s.add("met"); q = _person(rng)
        ents.append(_ent(q, "person", s.add(q))); s.add("in"); ents.append(_ent(c, "location", s.add(c))); s.add(".")
    elif kind == 3:
        s.add("Nothing happened"); s.add(rng.choice(DAYS)); s.add(".")
    elif kind == 4:
        ents.append(_ent(o, "organization", s.add(o))); s.add("praised"); ents.append(_ent(p, "person", s.add(p)))
        s.add(".")
    else:
        s.add("Visitors from"); country = COUNTRY_OF[c]
        ents.append(_ent(country, "location", s.add(country))); s.add("came to"); ents.append(_ent(c, "location", s.add(c)))
        s.add(rng.choice(DAYS)); s.add(".")
    return {"sentence": s.text(), "entities": ents}


def _rel(head: dict, rtype: str, tail: dict) -> dict:
    return {"head": head, "type": rtype, "tail": tail}


def _re_record(rng: random.Random) -> dict:
    s = _Sentence()
    rels = []
    kind = rng.randrange(5)
    p, o, c = _person(rng), rng.choice(ORGS), rng.choice(CITIES)
    if kind == 0:
        hp = _ent(p, "person", s.add(p)); s.add("works for"); to = _ent(o, "organization", s.add(o)); s.add(".")
        rels.append(_rel(hp, "work for", to))
    elif kind == 1:
        hp = _ent(p, "person", s.add(p)); s.add("lives in"); tc = _ent(c, "location", s.add(c)); s.add("and works for")
        to = _ent(o, "organization", s.add(o)); s.add(".")
        rels += [_rel(hp, "live in", tc), _rel(hp, "work for", to)]
    elif kind == 2:
        ho = _ent(o, "organization", s.add(o)); s.add("is based in"); tc = _ent(c, "location", s.add(c)); s.add(",")
        country = COUNTRY_OF[c]; tk = _ent(country, "location", s.add(country)); s.add(".")
        rels += [_rel(ho, "based in", tc), _rel(_ent(c, "location", tc["pos"]), "located in", tk)]
    elif kind == 3:
        hp = _ent(p, "person", s.add(p)); s.add("visited"); s.add(c); s.add(rng.choice(DAYS)); s.add(".")
    else:
        s.add("In"); tc = _ent(c, "location", s.add(c)); s.add(","); hp = _ent(p, "person", s.add(p))
        s.add("runs a shop ."); rels.append(_rel(hp, "live in", tc))
    return {"sentence": s.text(), "relations": rels}


def _arg(name: str, role: str, span) -> dict:
    return {"name": name, "role": role, "pos": list(span)}


def _ee_record(rng: random.Random) -> dict:
    s = _Sentence()
    events = []
    kind = rng.randrange(4)
    p, o, c, d = _person(rng), rng.choice(ORGS), rng.choice(CITIES), rng.choice(DAYS)
    if kind == 0:
        a1 = _arg(o, "employer", s.add(o)); trig = s.add("hired"); a2 = _arg(p, "employee", s.add(p)); s.add("in")
        a3 = _arg(c, "place", s.add(c)); s.add(".")
        events.append({"trigger": "hired", "type": "hire", "pos": list(trig), "arguments": [a1, a2, a3]})
    elif kind == 1:
        a1 = _arg(p, "traveler", s.add(p)); trig = s.add("flew"); s.add("to"); a2 = _arg(c, "destination", s.add(c))
        a3 = _arg(d, "time", s.add(d)); s.add(".")
        events.append({"trigger": "flew", "type": "travel", "pos": list(trig), "arguments": [a1, a2, a3]})
    elif kind == 2:
        o2 = rng.choice([x for x in ORGS if x != o]); price = f"{rng.randint(2, 90)} million dollars"
        a1 = _arg(o, "buyer", s.add(o)); trig = s.add("bought"); a2 = _arg(o2, "target", s.add(o2)); s.add("for")
        a3 = _arg(price, "price", s.add(price)); s.add(".")
        events.append({"trigger": "bought", "type": "acquire", "pos": list(trig), "arguments": [a1, a2, a3]})
    else:
        a1 = _arg(o, "employer", s.add(o)); t1 = s.add("hired"); a2 = _arg(p, "employee", s.add(p)); s.add(", who then")
        t2 = s.add("moved"); s.add("to"); a3 = _arg(c, "destination", s.add(c)); s.add(".")
        events.append({"trigger": "hired", "type": "hire", "pos": list(t1), "arguments": [a1, a2]})
        events.append({"trigger": "moved", "type": "travel", "pos": list(t2),
                       "arguments": [_arg(p, "traveler", a2["pos"]), a3]})
    return {"sentence": s.text(), "events": events}


DATASETS: dict[str, tuple[str, Callable, object]] = {
    "NER/DemoNER": ("NER", _ner_record, NER_LABELS),
    "RE/DemoRE": ("RE", _re_record, RE_LABELS),
    "EE/DemoEE": ("EE", _ee_record, EE_LABELS),
}


def generate(out_dir: str | Path, seed: int = DEFAULT_SEED, sizes: dict[str, int] | None = None) -> Path:
    """Write the demo data sets under ``out_dir`` (IE INSTRUCTIONS layout); same seed, same bytes."""
    out = Path(out_dir)
    sizes = sizes or DEMO_SIZES
    for rel, (task, make, labels) in sorted(DATASETS.items()):
        splits = {}
        for split in ("train", "dev", "test"):
            rng = random.Random(f"{seed}/{rel}/{split}")
            splits[split] = [make(rng) for _ in range(sizes[split])]
        write_dataset(out, task, rel.split("/", 1)[1], labels, splits)
    return out


def demo_data_dir() -> Path:
    """Folder of the shipped demo data (inside the installed package)."""
    return Path(__file__).resolve().parent


def real_demo_data_dir() -> Path:
    """Folder of the shipped real demo data: subsets of public benchmarks (:mod:`prouie_pl.demo_data.real`)."""
    return demo_data_dir() / "real"


#: ``data_dir`` names of the embedded data: ``demo`` (synthetic) and ``demo_real`` (subsets of real benchmarks).
DATA_DIR_ALIASES: dict[str, Callable[[], Path]] = {"demo": demo_data_dir, "demo_real": real_demo_data_dir}


def demo_data_files() -> list[Path]:
    """The synthetic data set's files (``{NER,RE,EE}/<Dataset>/*.json``), sorted."""
    root = demo_data_dir()
    return sorted(p for task in DATASETS for p in (root / task).rglob("*.json"))
