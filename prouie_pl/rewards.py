"""Stepwise fine-grained rewards (SFR) over structural units.

A pure function of the completion text, the character offset where each completion token ends, and the gold
record.  The completion is parsed into units in the order they were generated (entities, relation triples,
event triggers, event arguments); each unit becomes one step that ends at the token holding the unit's last
character:

* a unit that matches a gold unit not matched before: ``+correct * weight[kind]``;
* a wrong unit, a repeat of a unit already rewarded, or a unit with a label or role outside the schema:
  ``wrong * weight[kind]`` (negative);
* the final step, at the last token: a format term (0 when the output parsed cleanly, ``format_penalty`` when
  it did not) plus ``missed * weight[kind]`` for every gold unit never produced, plus ``finish`` when the
  answer parsed cleanly.

Why ``finish`` (+1 by default; 0 gives the plain scheme): stepwise advantages normalise all step rewards of a
group together.  With a final step of 0 after unit steps of +1, even a perfect answer's last step falls below
the group mean, so the tokens that close the answer (the end token included) get a negative advantage and
training learns not to stop.  A clean ending worth as much as a correct unit keeps a perfect answer's steps
level (a group of perfect answers then gets zero advantages, as it should).

The outcome reward (logging and the ``outcome`` advantage mode) is the completion's F1 over the task's unit
kinds plus the format term.  Malformed output never raises: what can be recovered is rewarded, the rest is
the format term.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .parser import parse_output
from .schema import UNIT_KINDS, Record, record_units
from .scoring import units_f1


@dataclass
class RewardSettings:
    """SFR settings.

    Args:
        correct: reward of a unit that matches a gold unit not matched before.
        wrong: reward of a wrong, repeated or out-of-schema unit.
        missed: reward per gold unit never produced (final step).
        format_penalty: reward of the format term when the output did not parse cleanly (0 when it did).
        finish: added to the final step when the output parsed cleanly (see the module docstring).
        weights: per unit kind (entity, relation, trigger, argument) multiplier of the three unit rewards.
    """

    correct: float = 1.0
    wrong: float = -1.0
    missed: float = -1.0
    format_penalty: float = -1.0
    finish: float = 1.0
    weights: dict[str, float] = field(default_factory=lambda: {k: 1.0 for k in UNIT_KINDS})

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(UNIT_KINDS)
        if unknown:
            raise ValueError(f"model.reward.weights has unknown unit kinds {sorted(unknown)}; use {', '.join(UNIT_KINDS)}")
        for k in UNIT_KINDS:
            self.weights.setdefault(k, 1.0)


@dataclass
class RewardResult:
    steps: list[tuple[int, float]]  # (token index where the step ends, reward), in generation order
    outcome: float
    f1: float
    parsed_ok: bool
    format_term: float
    correct: Counter = field(default_factory=Counter)  # per unit kind
    predicted: Counter = field(default_factory=Counter)
    missed: int = 0

    @property
    def total(self) -> float:
        return sum(r for _, r in self.steps)


def token_index(token_ends: Sequence[int], char_end: int) -> int:
    """Index of the token that holds character ``char_end - 1`` (the last token if past the end)."""
    if not token_ends:
        return 0
    i = bisect.bisect_left(token_ends, char_end)
    return min(i, len(token_ends) - 1)


def sfr_reward(text: str, token_ends: Sequence[int], record: Record, settings: Optional[RewardSettings] = None,
               n_tokens: Optional[int] = None) -> RewardResult:
    """Stepwise rewards of one completion.

    ``token_ends[i]`` is the character offset in ``text`` right after token ``i``; ``n_tokens`` (default
    ``len(token_ends)``) counts every completion token including an end token that adds no text, so the final
    step lands on the very last token.
    """
    s = settings or RewardSettings()
    n_tokens = len(token_ends) if n_tokens is None else n_tokens
    last = max(0, n_tokens - 1)
    parsed = parse_output(text, record.task, record.schema)
    gold = record_units(record)
    remaining = Counter(u.key() for u in gold)
    steps: list[tuple[int, float]] = []
    correct: Counter = Counter()
    predicted: Counter = Counter()
    for u in parsed.units:
        predicted[u.kind] += 1
        w = s.weights[u.kind]
        k = u.key()
        if u.in_schema and remaining[k] > 0:
            remaining[k] -= 1
            correct[u.kind] += 1
            r = s.correct * w
        else:
            r = s.wrong * w
        steps.append((min(token_index(token_ends, u.end), last), r))
    missed_units = [k for k, n in remaining.items() for _ in range(n)]
    missed_reward = sum(s.missed * s.weights[k[0]] for k in missed_units)  # k[0] is the unit kind
    format_term = 0.0 if parsed.ok else s.format_penalty
    steps.append((last, format_term + missed_reward + (s.finish if parsed.ok else 0.0)))
    f1 = units_f1(gold, parsed.units, record.task)
    return RewardResult(steps, f1 + format_term, f1, parsed.ok, format_term, correct, predicted, len(missed_units))


def completion_token_ends(tokenizer, ids: Sequence[int]) -> tuple[str, list[int]]:
    """Decoded completion text (special tokens skipped) and the text offset right after each token.

    Tokens are decoded one at a time (a token that ends inside a multi-byte character re-decodes the running
    text).  Tokenizers whose pieces do not concatenate to the whole (SentencePiece drops the leading space of
    a lone piece) fall back to decoding every prefix.
    """
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    kept: list[int] = []
    ends: list[int] = []
    text = ""
    for tid in ids:
        if tid not in special:
            kept.append(tid)
            piece = tokenizer.decode([tid], skip_special_tokens=True)
            text = tokenizer.decode(kept, skip_special_tokens=True) if "\ufffd" in piece else text + piece
        ends.append(len(text))
    whole = tokenizer.decode(kept, skip_special_tokens=True)
    if whole != text:
        ends, prefix = [], []
        for tid in ids:
            if tid not in special:
                prefix.append(tid)
            ends.append(len(tokenizer.decode(prefix, skip_special_tokens=True)))
    return whole, ends
