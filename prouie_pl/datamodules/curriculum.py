"""Curriculum phases of the Complete Modeling stage.

ProUIE trains tasks in difficulty order NER -> RE -> EE.  A :class:`Curriculum` turns a schedule name into
phases, each a set of tasks trained for a number of epochs:

* ``sequential`` (default): one phase per task; ``replay_fraction`` mixes a share of every earlier task's
  records into later phases (drawn anew each epoch) so earlier tasks are not forgotten;
* ``cumulative``: NER; NER+RE; NER+RE+EE;
* ``mixed``: one phase with every task shuffled together (the multitask baseline for ablations).

The phase of an epoch is a pure function of the epoch number, so resuming from a checkpoint lands in the
same phase without any state of its own.  The last phase has no end: training stops at ``max_epochs`` /
``max_steps`` or early stopping (which the curriculum callback holds off until the last phase starts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

from ..schema import TASKS

SCHEDULES = ("sequential", "cumulative", "mixed")


@dataclass(frozen=True)
class Phase:
    name: str
    tasks: tuple[str, ...]
    replay_tasks: tuple[str, ...] = ()


class Curriculum:
    def __init__(self, schedule: str, tasks: Sequence[str], epochs_per_phase: Union[int, Sequence[int]] = 1, replay_fraction: float = 0.0):
        if schedule not in SCHEDULES:
            raise ValueError(f"data.schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
        if not 0.0 <= replay_fraction <= 1.0:
            raise ValueError(f"data.replay_fraction must lie in [0, 1], not {replay_fraction}")
        ordered = [t for t in TASKS if t in tasks]
        if not ordered:
            raise ValueError("the curriculum needs at least one task with training data")
        self.schedule = schedule
        self.replay_fraction = replay_fraction
        if schedule == "mixed" or len(ordered) == 1:
            self.phases = [Phase("+".join(ordered), tuple(ordered))]
        elif schedule == "sequential":
            self.phases = [Phase(t, (t,), tuple(ordered[:i]) if replay_fraction > 0 else ()) for i, t in enumerate(ordered)]
        else:
            self.phases = [Phase("+".join(ordered[: i + 1]), tuple(ordered[: i + 1])) for i in range(len(ordered))]
        if isinstance(epochs_per_phase, int):
            epochs = [epochs_per_phase] * len(self.phases)
        else:
            epochs = list(epochs_per_phase)
            if len(epochs) != len(self.phases):
                raise ValueError(
                    f"data.epochs_per_phase has {len(epochs)} entries but the {schedule} schedule over "
                    f"{', '.join(ordered)} has {len(self.phases)} phases ({', '.join(p.name for p in self.phases)})"
                )
        if any(e < 1 for e in epochs):
            raise ValueError(f"data.epochs_per_phase entries must be >= 1, not {epochs}")
        self.epochs = epochs

    @property
    def planned_epochs(self) -> int:
        """Epochs until the last phase has had its share (training may go on in the last phase)."""
        return sum(self.epochs)

    @property
    def last_phase_start(self) -> int:
        return self.phase_start(len(self.phases) - 1)

    def phase_start(self, index: int) -> int:
        """The first epoch of phase ``index``."""
        return sum(self.epochs[:index])

    def phase_index(self, epoch: int) -> int:
        acc = 0
        for i, e in enumerate(self.epochs):
            acc += e
            if epoch < acc:
                return i
        return len(self.phases) - 1

    def phase(self, epoch: int) -> Phase:
        return self.phases[self.phase_index(epoch)]

    def describe(self) -> str:
        parts = [f"{p.name} x{e}" + (f" (+{self.replay_fraction:.0%} replay of {', '.join(p.replay_tasks)})" if p.replay_tasks else "")
                 for p, e in zip(self.phases, self.epochs)]
        return f"{self.schedule}: " + " -> ".join(parts)
