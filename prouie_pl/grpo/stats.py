"""What a GRPO step reports: :class:`PassStats` per update pass, :class:`StepStats` per step, and the phase clock.

``StepStats.as_log()`` is the dictionary the module logs (``train/*``, ``time/*``) and keeps as
``last_step_stats`` for callbacks and benchmarks.  Phases (:class:`PhaseTimer`): ``generate`` (rollouts),
``reward`` (SFR rewards and advantages), ``reference`` (no-grad log-prob passes), ``policy`` (forward, backward and
optimizer step of every pass) and ``step`` (the whole training step).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..schema import Record
from .trajectory import Trajectory


class PhaseTimer:
    """Wall time per phase of one step, from construction to :meth:`finish`."""

    def __init__(self):
        self._start = time.perf_counter()
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0

    def finish(self) -> dict[str, float]:
        self.times["step"] = time.perf_counter() - self._start
        return dict(self.times)


@dataclass
class PassStats:
    """One update pass: its loss (the sum of the weighted micro-batch losses, i.e. the loss of the whole batch)
    and the loss metrics (``clip_ratio``, ``kl``) averaged over completion tokens."""

    loss: float = 0.0
    metrics: dict[str, float] = field(default_factory=lambda: defaultdict(float))


@dataclass
class StepStats:
    """One GRPO step, ready to log."""

    loss: float  # mean over passes
    metrics: dict[str, float]  # loss metrics, mean over passes
    outcomes: torch.Tensor  # [N] outcome reward per completion
    f1: float  # mean completion F1
    parsed_share: float
    zero_spread_share: float  # groups without reward spread
    completion_length: float
    truncated_share: float
    reward_by_task: dict[str, list[float]]
    correct: Counter
    predicted: Counter
    times: dict[str, float]
    lr: float

    @classmethod
    def collect(cls, trajectory: Trajectory, prompt_records: Sequence[Record], passes: Sequence[PassStats],
                times: dict[str, float], lr: float) -> "StepStats":
        rewards = trajectory.rewards
        n = len(rewards)
        metrics: dict[str, float] = defaultdict(float)
        for p in passes:
            for k, v in p.metrics.items():
                metrics[k] += v / len(passes)
        by_task: dict[str, list[float]] = defaultdict(list)
        correct, predicted = Counter(), Counter()
        for i, r in enumerate(rewards):
            by_task[prompt_records[i // trajectory.group_size].task].append(r.outcome)
            correct.update(r.correct)
            predicted.update(r.predicted)
        return cls(
            loss=sum(p.loss for p in passes) / max(1, len(passes)),
            metrics=dict(metrics),
            outcomes=torch.tensor([r.outcome for r in rewards]),
            f1=float(sum(r.f1 for r in rewards) / n),
            parsed_share=float(sum(r.parsed_ok for r in rewards) / n),
            zero_spread_share=float(1.0 - trajectory.groups_with_signal().float().mean()),
            completion_length=float(trajectory.lengths.float().mean()),
            truncated_share=float(trajectory.truncated.float().mean()),
            reward_by_task=dict(by_task),
            correct=correct,
            predicted=predicted,
            times=times,
            lr=lr,
        )

    @property
    def completions(self) -> int:
        return len(self.outcomes)

    @property
    def mean_reward(self) -> float:
        return float(self.outcomes.mean())

    def as_log(self) -> dict[str, float]:
        o = self.outcomes
        log = {
            "train/loss": self.loss,
            "train/reward": float(o.mean()),
            "train/reward_std": float(o.std()) if len(o) > 1 else 0.0,
            "train/f1": self.f1,
            "train/zero_spread_groups": self.zero_spread_share,
            "train/completion_length": self.completion_length,
            "train/truncated_share": self.truncated_share,
            "train/parse_ok_share": self.parsed_share,
            "train/clip_ratio": self.metrics.get("clip_ratio", 0.0),
            "train/kl": self.metrics.get("kl", 0.0),
            "train/completions_per_s": self.completions / max(self.times["step"], 1e-9),
            "train/lr": self.lr,
        }
        for task, values in self.reward_by_task.items():
            t = torch.tensor(values)
            log[f"train/reward_{task}"] = float(t.mean())
            log[f"train/reward_std_{task}"] = float(t.std()) if len(values) > 1 else 0.0
        for kind, p in self.predicted.items():
            log[f"train/precision_{kind}"] = self.correct[kind] / p if p else 0.0
        for k, v in self.times.items():
            log[f"time/{k}"] = v
        log["time/outside_generate_share"] = 1.0 - self.times.get("generate", 0.0) / max(self.times["step"], 1e-9)
        return log
