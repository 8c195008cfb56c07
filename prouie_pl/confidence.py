"""How sure the model was of each unit it wrote: scores, the threshold that keeps the sure ones, calibration.

A unit's score is the probability the model gave to the tokens that wrote it, under the distribution each was
chosen from (greedy: the model's softmax; constrained decoding: the constrained distribution).  Which tokens
"wrote" a unit follows the stepwise view of the GRPO reward (:func:`prouie_pl.rewards.sfr_reward`): the parser
returns the units in output order with the character offset where each one's text ends, and

* the unit's **step** is every token after the one that ended the unit before it, up to and including the
  token that ends this one (the separator that decided "one more", the key when the unit opens a new label,
  the span itself); a token that ends two units belongs to both;
* the unit's **label** is the JSON key it sits under (entity type, relation type, event type): the tokens that
  wrote the last ``"key"`` before the unit.  Later units under the same key do not repeat it in their step, yet
  each is only right if the key is, so the label's tokens count for every unit under it.

``step_label`` (the default) multiplies the probabilities of the union of the two token sets; ``step`` uses the
step alone, ``step_mean`` the geometric mean over the union (a per-token average that does not fall with
length).  The product is a joint probability of what the unit's correctness depends on: which of them tracks
correctness best is measured in ``bench/calibration.py`` (reliability tables and expected calibration error per
task).  A one-parameter calibration, ``p ** (1 / T)`` (a temperature on the unit's log-probability), is fitted
on dev by log loss and saved as ``confidence.json`` with the adapter; :class:`Calibration` applies it.

A threshold keeps the units whose score is greater than it: 0 keeps everything, 1 keeps nothing (scores never
exceed 1).  Malformed outputs never raise here: units the parser could not recover have no score to give.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .parser import parse_output
from .schema import Record, Unit, record_units

SCORE_METHODS: tuple[str, ...] = ("step_label", "step", "step_mean")
CALIBRATION_FILE = "confidence.json"


def check_threshold(threshold: float, option: str = "threshold") -> float:
    t = float(threshold)
    if not 0.0 <= t <= 1.0 or math.isnan(t):
        raise ValueError(f"{option} must lie in [0, 1], not {threshold!r}")
    return t


def keep_unit(score: Optional[float], threshold: float) -> bool:
    """Whether a unit with ``score`` passes ``threshold`` (0 keeps every unit, scored or not)."""
    if threshold <= 0.0:
        return True
    return score is not None and score > threshold


# ------------------------------------------------------------------------------------------ token sets


def _token_starts(token_ends: Sequence[int]) -> list[int]:
    return [0] + list(token_ends[:-1])


def _label_tokens(text: str, label: str, before: int, starts: Sequence[int], ends: Sequence[int]) -> list[int]:
    """Tokens that wrote the last ``"label"`` key (case-insensitive) that ends at or before ``before``."""
    if not label:
        return []
    low, key = text[:before].lower(), f'"{label.lower()}"'
    k0 = low.rfind(key)
    if k0 < 0:
        return []
    k1 = k0 + len(key)
    first = bisect.bisect_right(ends, k0)  # the first token that ends after k0
    out = []
    for t in range(first, len(ends)):
        if starts[t] >= k1:
            break
        out.append(t)
    return out


def unit_token_sets(text: str, token_ends: Sequence[int], units: Sequence[Unit], n_tokens: Optional[int] = None
                    ) -> list[tuple[list[int], list[int]]]:
    """``(step tokens, label tokens)`` of each unit (indices into the completion's tokens; see the module
    docstring).  ``token_ends[i]`` is the text offset right after token ``i`` (:func:`completion_token_ends`)."""
    from .rewards import token_index

    n_tokens = len(token_ends) if n_tokens is None else n_tokens
    last = max(0, n_tokens - 1)
    starts = _token_starts(token_ends)
    out = []
    prev = -1
    for u in units:
        b = min(token_index(token_ends, u.end), last)
        step = list(range(prev + 1, b + 1)) if b > prev else [b]
        # the key precedes the unit's text (whose closing quote lies at or after u.end)
        label = _label_tokens(text, u.label, u.end, starts, token_ends)
        out.append((step, label))
        prev = max(prev, b)
    return out


def combine(logprobs: Sequence[float], step: Sequence[int], label: Sequence[int], method: str = "step_label") -> float:
    """The score of one unit from its completion's token log-probabilities and its token sets."""
    if method not in SCORE_METHODS:
        raise ValueError(f"score method must be one of {', '.join(SCORE_METHODS)}, not {method!r}")
    chosen = sorted(set(step) if method == "step" else set(step) | set(label))
    vals = [float(logprobs[t]) for t in chosen if 0 <= t < len(logprobs)]
    if not vals:
        return 1.0
    total = sum(vals)
    if method == "step_mean":
        total /= len(vals)
    if math.isnan(total):
        return 0.0
    return math.exp(min(0.0, total))


# ------------------------------------------------------------------------------------------ calibration


@dataclass(frozen=True)
class Calibration:
    """Scoring rule and temperature: a raw score ``p`` becomes ``p ** (1 / T)``, ``T`` the task's own
    temperature when ``temperatures`` has one (``{"NER": 1.8, ...}``), else ``temperature``."""

    method: str = "step_label"
    temperature: float = 1.0
    fitted_on: str = ""
    units: int = 0
    temperatures: dict = field(default_factory=dict)

    def apply(self, score: float, task: Optional[str] = None) -> float:
        if score <= 0.0:
            return 0.0
        t = self.temperatures.get(task, self.temperature) if task is not None else self.temperature
        return math.exp(math.log(min(score, 1.0)) / t)

    def to_json(self) -> dict:
        return {"method": self.method, "temperature": self.temperature, "temperatures": dict(self.temperatures),
                "fitted_on": self.fitted_on, "units": self.units}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CALIBRATION_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path | None) -> "Calibration":
        """The calibration saved with an adapter, or the identity (``step_label``, T = 1) when it has none."""
        if folder is None:
            return cls()
        path = Path(folder) / CALIBRATION_FILE
        if not path.is_file():
            return cls()
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            method, temperature = str(obj.get("method", "step_label")), float(obj["temperature"])
            per_task = {str(k): float(v) for k, v in (obj.get("temperatures") or {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a confidence calibration ({type(exc).__name__}: {exc}); delete it or fit it again") from exc
        if method not in SCORE_METHODS or not temperature > 0 or not all(t > 0 for t in per_task.values()):
            raise ValueError(f"{path}: method {method!r} / temperatures {temperature!r}, {per_task} invalid "
                             f"(methods: {', '.join(SCORE_METHODS)}; temperatures > 0)")
        return cls(method, temperature, str(obj.get("fitted_on", "")), int(obj.get("units", 0)), per_task)


def log_loss(scores: Sequence[float], correct: Sequence[bool]) -> float:
    eps = 1e-6
    n = max(1, len(scores))
    return -sum(math.log(min(max(p, eps), 1 - eps)) if c else math.log(1 - min(max(p, eps), 1 - eps))
                for p, c in zip(scores, correct)) / n


def fit_temperature(scores: Sequence[float], correct: Sequence[bool], low: float = 0.05, high: float = 20.0) -> float:
    """The temperature ``T`` that minimises the log loss of ``p ** (1 / T)`` against ``correct`` (a grid over
    log T, then a golden-section search around the best grid point)."""
    if not scores:
        return 1.0
    cal = lambda t: log_loss([Calibration(temperature=t).apply(p) for p in scores], correct)  # noqa: E731
    grid = [math.exp(math.log(low) + (math.log(high) - math.log(low)) * i / 40) for i in range(41)]
    losses = [cal(t) for t in grid]
    i = min(range(len(grid)), key=losses.__getitem__)
    a, b = math.log(grid[max(0, i - 1)]), math.log(grid[min(len(grid) - 1, i + 1)])
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(40):
        if cal(math.exp(c)) < cal(math.exp(d)):
            b = d
        else:
            a = c
        c, d = b - g * (b - a), a + g * (b - a)
    return math.exp((a + b) / 2)


def reliability(scores: Sequence[float], correct: Sequence[bool], bins: int = 10) -> tuple[list[dict], float]:
    """Units binned by score (equal-width bins over [0, 1]): per bin the count, mean score and share correct;
    and the expected calibration error (count-weighted mean of |share correct - mean score|)."""
    rows = [{"low": i / bins, "high": (i + 1) / bins, "n": 0, "score_sum": 0.0, "correct": 0} for i in range(bins)]
    for p, c in zip(scores, correct):
        b = rows[min(bins - 1, max(0, int(p * bins)))]
        b["n"] += 1
        b["score_sum"] += p
        b["correct"] += int(bool(c))
    n = max(1, len(scores))
    ece = 0.0
    out = []
    for b in rows:
        mean = b["score_sum"] / b["n"] if b["n"] else None
        acc = b["correct"] / b["n"] if b["n"] else None
        if b["n"]:
            ece += b["n"] / n * abs(acc - mean)
        out.append({"low": b["low"], "high": b["high"], "n": b["n"], "mean_score": mean, "accuracy": acc})
    return out, ece


# ------------------------------------------------------------------------------------------ per answer


def unit_correctness(record: Record, units: Sequence[Unit]) -> list[bool]:
    """Whether each predicted unit matches a gold unit not matched before it (the strict keys of the scorer:
    type and span; head, type and tail; event type, role and argument)."""
    remaining = Counter(u.key() for u in record_units(record))
    out = []
    for u in units:
        k = u.key()
        ok = u.in_schema and remaining[k] > 0
        if ok:
            remaining[k] -= 1
        out.append(bool(ok))
    return out


@dataclass
class ScoredAnswer:
    """The units of one answer (parse order) with their scores."""

    units: list[Unit]
    scores: list[float]


def score_answer(tokenizer, output: str, token_ids: Sequence[int], token_logprobs: Sequence[float], task: str, schema=None,
                 method: str = "step_label", calibration: Optional[Calibration] = None) -> ScoredAnswer:
    """Parse ``output`` and score each unit from the answer's tokens; never raises on a malformed answer.

    The token offsets come from decoding ``token_ids`` one by one; when that text differs from ``output`` (a
    tokenizer that cleans spaces up on decode), each of the output's units takes the score of the first
    unscored unit with the same key in the token text, and units without one score 0."""
    from .rewards import completion_token_ends

    parsed = parse_output(output, task, schema)
    if not parsed.units:
        return ScoredAnswer([], [])
    method = calibration.method if calibration is not None else method
    try:
        text, ends = completion_token_ends(tokenizer, list(token_ids))
        units = parsed.units if text == output else parse_output(text, task, schema).units
        sets = unit_token_sets(text, ends, units, len(token_ids))
        raw = [combine(token_logprobs, step, label, method) for step, label in sets]
    except Exception:  # scores are extra information: a failure here must not lose the answer
        return ScoredAnswer(list(parsed.units), [0.0] * len(parsed.units))
    if units is not parsed.units:
        pool: dict = {}
        for u, s in zip(units, raw):
            pool.setdefault(u.key(), []).append(s)
        raw = [pool[u.key()].pop(0) if pool.get(u.key()) else 0.0 for u in parsed.units]
    if calibration is not None:
        raw = [calibration.apply(s, task) for s in raw]
    return ScoredAnswer(list(parsed.units), raw)
