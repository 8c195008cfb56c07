"""Compatibility scoring: the InstructUIE scorer's published behaviour for NER and RE, quirks included.

InstructUIE (``src/evaluation/evaluator.py``) scores text answers of the form ``type: name; type: name`` (NER)
and ``relation: head, tail; ...`` (RE) against ground-truth strings built the same way from the data.  Both
sides go through one normalisation (:func:`iuie_normalize`), are split on ``;`` and compared as sets per record,
and the counts are summed over a data set.  The quirks that make its numbers differ from strict scoring:

* ``location`` becomes ``located`` everywhere, spaces around ``, : ( ) . _ ; ' -`` vanish, braces are deleted
  and runs of ``, . ;`` collapse, so some different strings compare equal;
* NER: every piece is an item, so the empty answer ``None`` is itself an item (an empty gold answered with
  ``None`` is one true positive) and a trailing ``;`` adds an empty item;
* RE: only pieces containing ``:`` count; entity types are ignored; ``head, tail`` order matters; gold
  relations typed ``NA`` or ``""`` enter the ground truth as ``NA`` with InstructUIE's NA rule.

An output in this project's JSON formats is first parsed and written in InstructUIE's text form; any other
output (for example a prediction file made by InstructUIE itself) is scored as the raw text it is.
"""

from __future__ import annotations

import re

from .parser import ParseResult
from .schema import Record

_SPACE_AROUND = re.compile(r"\s*(,|:|\(|\)|\.|_|;|'|-)\s*")
_INSANE_OK = {"na", "no relation", "none", "[]", ""}


def iuie_normalize(s: str) -> str:
    """InstructUIE's ``_format``: the one normalisation applied to both sides."""
    s = " ".join(s.split())
    s = _SPACE_AROUND.sub(r"\1", s)
    s = s.lower()
    s = s.replace("{", "").replace("}", "")
    s = re.sub(",+", ",", s)
    s = re.sub(r"\.+", ".", s)
    s = re.sub(";+", ";", s)
    s = s.replace("\u2019", "'")
    s = s.replace("location", "located")
    return s


def gold_string(record: Record) -> str:
    """The ground-truth string InstructUIE builds from a record (``" None"`` when there is nothing)."""
    if record.task == "NER":
        items = [f"{e.type}: {e.name}" for e in record.entities if e.type not in ("NA", "")]
    elif record.task == "RE":
        items = [f"{'NA' if r.type in ('NA', '') else r.type}: {r.head.name}, {r.tail.name}" for r in record.relations]
    else:
        raise ValueError("the InstructUIE compatibility mode covers NER and RE")
    return " " + "; ".join(items) if items else " None"


def prediction_string(output: str, task: str, parsed: ParseResult) -> str:
    """A JSON answer in InstructUIE's text form; any other text unchanged."""
    if not output.lstrip().startswith("{"):
        return output
    if task == "NER":
        items = [f"{u.label}: {u.text}" for u in parsed.units if u.kind == "entity"]
    else:
        items = [f"{u.label}: {u.head}, {u.tail}" for u in parsed.units if u.kind == "relation"]
    return "; ".join(items) if items else "None"


def ner_items(text: str) -> set[str]:
    return {iuie_normalize(x) for x in iuie_normalize(text).split(";")}


def re_items(text: str) -> set[str]:
    out = set()
    for x in iuie_normalize(text).split(";"):
        x = iuie_normalize(x)
        if ":" in x:
            out.add(x)
    return out


def re_counts_na(truth: set[str], pred: set[str]) -> tuple[int, int, int]:
    """InstructUIE's ``MetricF1NA.update``: set matching, with its special rule for items holding ``,na,``."""
    tp = fn = fp = 0
    for t in truth:
        if ",na," in t:
            pattern = re.compile(re.escape(t).replace(",na,", ",(.+),"))
            fail = False
            for p in pred:
                m = pattern.match(p)
                if m is not None and m.group(1) != "na":
                    fail = True
                    break
            if not fail:
                tp += 1
        elif t in pred:
            tp += 1
        else:
            fn += 1
    for p in pred:
        if ",na," in p:
            pattern = re.compile(re.escape(p).replace(",na,", ",(.+),"))
            fail = False
            for t in truth:
                m = pattern.match(t)
                if m is not None and m.group(1) != "na":
                    fail = True
                    break
            if fail:
                fp += 1
        elif p not in truth:
            fp += 1
    return tp, fp, fn


def score_record(record: Record, output: str, parsed: ParseResult) -> tuple[dict[str, tuple[int, int, int]], bool]:
    """Counts for ``NER`` or ``RE_strict`` on one record, and whether the output counts as a parse failure."""
    pred_text = prediction_string(output, record.task, parsed)
    gold_text = gold_string(record)
    if record.task == "NER":
        truth, pred = ner_items(gold_text), ner_items(pred_text)
        tp = len(truth & pred)
        counts = {"NER": (tp, len(pred - truth), len(truth - pred))}
        has_item = any(":" in x for x in pred)
    else:
        truth, pred = re_items(gold_text), re_items(pred_text)
        counts = {"RE_strict": re_counts_na(truth, pred)}
        has_item = bool(pred)
    if output.lstrip().startswith("{"):
        failed = not parsed.ok
    else:
        failed = not has_item and output.strip().lower() not in _INSANE_OK
    return counts, failed
