"""The bundled real demo data set (``data_dir: demo_real``): seeded subsets of three public benchmarks.

Where the synthetic demo set (:mod:`prouie_pl.demo_data`) shows that the pipeline runs, this one runs it on
real sentences, one benchmark per task, chosen because their licences allow redistribution:

* ``NER/CrossNER_politics`` (MIT; Wikipedia sentences about politics, 9 entity types),
* ``RE/SemEval2010-Task8`` (CC BY 3.0; one nominal pair per sentence, 9 relation types, entity types ``""``;
  sentences with no relation (``Other`` in the source) are drawn like the others, so the mix is the source's),
* ``EE/PHEE`` (MIT; adverse and potential therapeutic drug events in case reports, 15 roles).

The files under ``real/`` were written from the IE INSTRUCTIONS conversion of the public releases by

    python -m prouie_pl.demo_data.real --src ../shared/data/uie --out prouie_pl/demo_data/real

and a test checks that the shipped files are exactly what this writes with the default seed.  Records are
copied verbatim: each line of a split file is the byte-for-byte text of one record in the source file
(the converter writes compact JSON), and ``labels.json`` is the source's, so prompts list the full label set
of each benchmark even where the subset happens not to use a label.  Each split is a seeded sample
(``random.Random(f"{seed}/{folder}/{split}")``) kept in source order; the same source and seed give the same
bytes.  ``LICENSES.md`` is written by the same run, from :data:`SUBSETS`, with the counts of what was drawn.

CrossNER_politics sentences are capped at 40 words (whitespace-separated tokens; the text is tokenised, so
punctuation counts).  Its sentences are long (median 40-43 words per split) and dense with entities, and the
cost of decoding grows with both: a longer prompt and a longer answer per sentence, which on a 2-core CPU
decides how long every validation and test pass takes.  The cap leaves 102 of its 200 training sentences, all
of which are kept.  SemEval and PHEE sentences are short (median 16-17 words) and are not capped.

What it is not: a benchmark.  Scores on 100 test sentences per task carry a sampling error of a few F1
points; compare with published numbers only on the full test sets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..reader import write_json_array
from . import DEFAULT_SEED, real_demo_data_dir

SPLITS = ("train", "dev", "test")
GOLD_KEY = {"NER": "entities", "RE": "relations", "EE": "events"}
MIT_URL = "https://opensource.org/license/mit"
#: The converter writes compact JSON; writing a record back the same way gives its exact source text.
COMPACT = (",", ":")
SCRIPT = "python -m prouie_pl.demo_data.real --src ../shared/data/uie --out prouie_pl/demo_data/real"

MIT_PERMISSION = """\
Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE."""


@dataclass(frozen=True)
class Subset:
    """One bundled data set: where it comes from, under which licence, and how much of each split is drawn."""

    folder: str  # TASK/Dataset, the same under the source root and under the output folder
    sizes: dict[str, int]  # records drawn per split (all eligible ones where there are fewer)
    licence: str
    licence_url: str
    source: str  # repository @ commit : path, as the shared data's README gives it
    citation: str
    text: str  # where the sentences themselves come from
    conversion: str  # what the conversion to the IE INSTRUCTIONS layout changed
    max_words: Optional[int] = None  # keep only sentences of at most this many whitespace-separated tokens
    notice: str = ""  # licence text to carry with the copies (MIT: copyright line and permission notice)

    @property
    def gold_key(self) -> str:
        return GOLD_KEY[self.folder.split("/")[0]]


SUBSETS: tuple[Subset, ...] = (
    Subset(
        folder="NER/CrossNER_politics",
        sizes={"train": 200, "dev": 40, "test": 100},
        max_words=40,
        licence="MIT",
        licence_url=MIT_URL,
        source="zliucr/CrossNER @2e7ba2a : ner_data/politics/{train,dev,test}.txt",
        citation="Zihan Liu, Yan Xu, Tiezheng Yu, Wenliang Dai, Ziwei Ji, Samuel Cahyawijaya, Andrea Madotto and "
                 "Pascale Fung. 2021. CrossNER: Evaluating Cross-Domain Named Entity Recognition. Proceedings of the "
                 "AAAI Conference on Artificial Intelligence 35(15): 13452-13460. https://arxiv.org/abs/2012.04373",
        text="sentences from English Wikipedia articles on politics, selected and annotated by the CrossNER authors. "
             "The repository is MIT-licensed; Wikipedia's own text is available from its contributors under "
             "CC BY-SA (https://en.wikipedia.org/wiki/Wikipedia:Copyrights), which the MIT licence of the "
             "annotations does not replace",
        conversion="official split; BIO tags became character spans over the tokens joined by single spaces; labels "
                   "as lower-case words (`politicalparty` -> `political party`, `misc` -> `miscellaneous`, "
                   "`organisation` -> `organization`)",
        notice="MIT License\n\nCopyright (c) 2020 Zihan Liu\n\n" + MIT_PERMISSION,
    ),
    Subset(
        folder="RE/SemEval2010-Task8",
        sizes={"train": 300, "dev": 40, "test": 100},
        licence="CC BY 3.0",
        licence_url="https://creativecommons.org/licenses/by/3.0/",
        source="roomylee/rcnn-text-classification @e8c5629 : SemEval2010_task8_all_data/.../TRAIN_FILE.TXT, "
               "TEST_FILE_FULL.TXT",
        citation="Iris Hendrickx, Su Nam Kim, Zornitsa Kozareva, Preslav Nakov, Diarmuid Ó Séaghdha, Sebastian Padó, "
                 "Marco Pennacchiotti, Lorenza Romano and Stan Szpakowicz. 2010. SemEval-2010 Task 8: Multi-Way "
                 "Classification of Semantic Relations between Pairs of Nominals. Proceedings of the 5th "
                 "International Workshop on Semantic Evaluation (SemEval 2010), pages 33-38. "
                 "https://aclanthology.org/S10-1006/",
        text="sentences collected from the Web by the task organisers, some reused from SemEval-2007 Task 4; the "
             "README of the training release puts the data set under the Creative Commons Attribution 3.0 Unported "
             "licence",
        conversion="the `<e1>`/`<e2>` tags became character spans (entity type `\"\"`: the source has none); "
                   "`Relation(e1,e2)` -> head e1, tail e2 and `Relation(e2,e1)` -> head e2, tail e1; `Other` -> "
                   "`relations: []`; labels as lower-case words (`Cause-Effect` -> `cause effect`); no official dev "
                   "split, so dev is the last 800 training sentences",
    ),
    Subset(
        folder="EE/PHEE",
        sizes={"train": 300, "dev": 40, "test": 100},
        licence="MIT",
        licence_url=MIT_URL,
        source="ZhaoyueSun/PHEE @41489b0 : data/json/{train,dev,test}.json",
        citation="Zhaoyue Sun, Jiazheng Li, Gabriele Pergola, Byron C. Wallace, Bino John, Nigel Greene, Joseph Kim "
                 "and Yulan He. 2022. PHEE: A Dataset for Pharmacovigilance Event Extraction from Text. Proceedings "
                 "of the 2022 Conference on Empirical Methods in Natural Language Processing, pages 5571-5587. "
                 "https://doi.org/10.18653/v1/2022.emnlp-main.376",
        text="sentences from published medical case reports (MEDLINE abstracts), selected and annotated by the "
             "PHEE authors",
        conversion="official split; event types `adverse event` and `potential therapeutic event`; roles are the "
                   "main arguments (`subject`, `treatment`, `effect`) and sub-arguments as `<main> <sub>` "
                   "(`treatment drug`, `subject age`, ...); attribute cues (speculated, negated, severity) not used; "
                   "a discontinuous span became one argument per fragment",
        notice="MIT License\n\nCopyright (c) 2025 Sun Zhaoyue\n\n" + MIT_PERMISSION,
    ),
)


def eligible(records: Sequence[dict], max_words: Optional[int]) -> list[int]:
    """Indices of the records that may be drawn: all, or those of at most ``max_words`` whitespace-separated tokens."""
    return [i for i, r in enumerate(records) if max_words is None or len(r["sentence"].split()) <= max_words]


def draw(candidates: list[int], size: int, rng: random.Random) -> list[int]:
    """``size`` of ``candidates`` at random (all of them if there are fewer), in source order."""
    if len(candidates) <= size:
        return list(candidates)
    return sorted(rng.sample(candidates, size))


@dataclass
class SplitDraw:
    """What one split of one data set gave: the source's size, how many were eligible, what was kept."""

    source_records: int
    eligible: int
    records: list[dict]
    source_sha256: str


def _read_source(path: Path) -> tuple[bytes, list[dict]]:
    if not path.is_file():
        raise SystemExit(f"{path}: not found; --src must be the IE INSTRUCTIONS root that holds {path.parent.name} "
                         f"under {path.parent.parent.name}/ (e.g. ../shared/data/uie)")
    raw = path.read_bytes()
    return raw, json.loads(raw.decode("utf-8"))


def build(src: str | Path, out: str | Path | None = None, seed: int = DEFAULT_SEED) -> Path:
    """Write every :data:`SUBSETS` entry under ``out`` (default: the package's ``real/``) and ``LICENSES.md``."""
    src = Path(src)
    out = real_demo_data_dir() if out is None else Path(out)
    drawn: dict[str, dict[str, SplitDraw]] = {}
    for subset in SUBSETS:
        folder = out / subset.folder
        folder.mkdir(parents=True, exist_ok=True)
        labels_raw, _ = _read_source(src / subset.folder / "labels.json")
        (folder / "labels.json").write_bytes(labels_raw)
        drawn[subset.folder] = {}
        for split in SPLITS:
            raw, records = _read_source(src / subset.folder / f"{split}.json")
            candidates = eligible(records, subset.max_words)
            kept = [records[i] for i in draw(candidates, subset.sizes[split], random.Random(f"{seed}/{subset.folder}/{split}"))]
            write_json_array(folder / f"{split}.json", kept, separators=COMPACT)
            drawn[subset.folder][split] = SplitDraw(len(records), len(candidates), kept, hashlib.sha256(raw).hexdigest())
    (out / "LICENSES.md").write_text(licences_markdown(drawn, seed), encoding="utf-8")
    return out


def _gold_items(subset: Subset, records: list[dict]) -> str:
    units = [r[subset.gold_key] for r in records]
    if subset.gold_key == "entities":
        return f"{sum(map(len, units))} entities"
    if subset.gold_key == "relations":
        return f"{sum(map(len, units))} relations, {sum(1 for u in units if not u)} sentences with none"
    args = sum(len(ev.get("arguments", [])) for u in units for ev in u)
    return f"{sum(map(len, units))} events, {args} arguments"


def licences_markdown(drawn: dict[str, dict[str, SplitDraw]], seed: int) -> str:
    """``LICENSES.md``: per data set its source, licence, citation and exactly what was drawn."""
    lines = [
        "# Bundled real demo data: sources and licences",
        "",
        "Small subsets of three public benchmarks in the IE INSTRUCTIONS layout (`data_dir: demo_real`), drawn from",
        "their conversion to that layout (records kept verbatim, `labels.json` unchanged) by",
        "",
        f"    {SCRIPT}",
        "",
        f"with seed {seed}. Each split is a seeded random sample (`random.Random(\"{seed}/<TASK>/<Dataset>/<split>\")`)",
        "kept in source order. Each data set below keeps the licence of its source; none is a benchmark at this size.",
        "",
        "| Folder | Licence | train | dev | test |",
        "|---|---|---|---|---|",
    ]
    for subset in SUBSETS:
        cells = [str(len(drawn[subset.folder][s].records)) for s in SPLITS]
        lines.append(f"| {subset.folder} | {subset.licence} | " + " | ".join(cells) + " |")
    for subset in SUBSETS:
        splits = drawn[subset.folder]
        cap = (f"sentences of at most {subset.max_words} words (whitespace-separated tokens), because decoding long "
               "sentences is slow on a 2-core CPU; then " if subset.max_words else "")
        lines += [
            "",
            f"## {subset.folder}",
            "",
            f"- Licence: {subset.licence} ({subset.licence_url})",
            f"- Source: {subset.source}",
            f"- Text: {subset.text}.",
            f"- Cite: {subset.citation}",
            f"- Conversion to the IE INSTRUCTIONS layout (before subsetting): {subset.conversion}.",
            f"- Subset: {cap}up to " + ", ".join(f"{subset.sizes[s]} {s}" for s in SPLITS) + " records, drawn at random "
            f"with seed {seed}; `labels.json` is the full data set's.",
            "",
            "| Split | source records | eligible | bundled | gold items | source file SHA-256 |",
            "|---|---|---|---|---|---|",
        ]
        for split in SPLITS:
            d = splits[split]
            lines.append(f"| {split} | {d.source_records} | {d.eligible} | {len(d.records)} | "
                         f"{_gold_items(subset, d.records)} | `{d.source_sha256[:16]}` |")
        if subset.notice:
            lines += ["", f"Licence notice of {subset.source.split(' ')[0]}:", "", "```", subset.notice, "```"]
        else:
            lines += ["", f"Changes made: the conversion and subsetting above. Licence terms: {subset.licence_url}."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prouie_pl.demo_data.real", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default="../shared/data/uie", help="IE INSTRUCTIONS root to draw from (default: %(default)s)")
    ap.add_argument("--out", default=None, help="output folder (default: the package's demo_data/real)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="sampling seed (default: %(default)s)")
    args = ap.parse_args(argv)
    out = build(args.src, args.out, args.seed)
    print(f"wrote the real demo data sets and LICENSES.md to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
