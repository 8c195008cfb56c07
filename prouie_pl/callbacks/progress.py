"""One progress line per pipeline stage, with an estimate of the time left for the whole run.

Inside a stage the estimate is the stage's own pace (seconds per optimizer step so far times the steps left,
from the steps the stage planned: the data's own plan (curriculum phases differ in size), else ``trainer.max_steps``
or ``trainer.estimated_stepping_batches``).  For the stages still to come it is the
pipeline's ``expected_seconds`` (what each stage took on a reference machine, from the pipeline YAML) scaled by
how fast this machine has been so far against the same reference (finished stages' seconds over their expected
ones); without ``expected_seconds`` the line only says how many stages are left.  On a terminal the line is
rewritten in place; in a log it is printed every ``interval`` seconds and at the end of the stage.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional

import lightning as L


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class StageProgress(L.Callback):
    """The progress line of one stage.

    Args:
        label: the stage's name as printed (``CM``, ``CM+SA``, ...).
        position: ``(k, n)``: this is stage ``k`` of ``n``.
        run_start: ``time.perf_counter()`` when the run began (the run's elapsed time).
        later: seconds the later stages are expected to take at this machine's pace, or None if unknown; a
            callable is asked each time (the pace it scales by can change).
        interval: seconds between printed lines when the output is not a terminal.
    """

    def __init__(self, label: str, position: tuple[int, int], run_start: float,
                 later: Optional[Callable[[], Optional[float]]] = None, interval: float = 30.0, stream=None):
        self.label, self.position, self.run_start = label, position, run_start
        self.later = later or (lambda: None)
        self.interval = interval
        self.stream = stream or sys.stdout
        self._t0 = 0.0
        self._last = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._shown_step: Optional[int] = None  # the step of the last line printed

    def _total(self, trainer) -> Optional[int]:
        plan = getattr(trainer.lightning_module, "schedule_steps", None)  # the data's own plan (see prouie_pl.wiring)
        if callable(plan):
            try:
                return int(plan())
            except Exception:  # a plan that cannot be made yet: the trainer's estimate below
                pass
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            n = trainer.estimated_stepping_batches
        except Exception:  # no dataloader length (iterable data): no stage estimate
            return None
        return int(n) if n and n != float("inf") else None

    def line(self, trainer) -> str:
        now = time.perf_counter()
        done, total = trainer.global_step, self._total(trainer)
        spent = now - self._t0
        k, n = self.position
        parts = [f"[prouie] stage {k}/{n} {self.label}: step {done}" + (f"/{total}" if total else ""), f"{clock(spent)} in this stage"]
        left = None
        if total and done:
            left = spent / done * max(0, total - done)
            parts.append(f"~{clock(left)} left in it")
        later = self.later()
        run = f"run {clock(now - self.run_start)}"
        if left is not None and later is not None:
            run += f", ~{clock(left + later)} left in the run"
        elif k < n:
            run += f", {n - k} stage{'s' if n - k > 1 else ''} after this one"
        parts.append(run)
        return ", ".join(parts)

    def _show(self, trainer, final: bool = False) -> None:
        if not trainer.is_global_zero:
            return
        if final and not self._tty and trainer.global_step == self._shown_step:
            return  # the last step's line is already printed
        self._shown_step = trainer.global_step
        text = self.line(trainer)
        if self._tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._tty or now - self._last >= self.interval:
            self._last = now
            self._show(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._show(trainer, final=True)

    # test decoding after the stage: its own line, batches instead of steps
    def on_test_start(self, trainer, pl_module) -> None:
        self._t0 = self._last = time.perf_counter()
        self._batches = 0

    def _test_line(self, trainer) -> str:
        now = time.perf_counter()
        total = sum(trainer.num_test_batches) if trainer.num_test_batches else None
        spent = now - self._t0
        k, n = self.position
        text = f"[prouie] stage {k}/{n} {self.label}: decoding the test split, batch {self._batches}" + (f"/{total}" if total else "")
        text += f", {clock(spent)}"
        left = spent / self._batches * (total - self._batches) if total and self._batches else None
        if left is not None:
            text += f", ~{clock(left)} left in it"
        text += f", run {clock(now - self.run_start)}"
        later = self.later() if left is not None else None
        if later is not None:
            text += f", ~{clock(left + later)} left in the run"
        return text

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batches += 1
        now = time.perf_counter()
        if trainer.is_global_zero and (self._tty or now - self._last >= self.interval):
            self._last = now
            self.stream.write(("\r\033[K" if self._tty else "") + self._test_line(trainer) + ("" if self._tty else "\n"))
            self.stream.flush()

    def on_test_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.stream.write(("\r\033[K" if self._tty else "") + self._test_line(trainer) + "\n")
            self.stream.flush()
