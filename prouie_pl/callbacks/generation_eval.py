"""``GenerationEvaluator``: generation-based validation, test and predict.

The module decodes greedily in its ``*_step`` (capped dev sample per data set for validation); this callback
collects the outputs (across ranks), parses and scores them with the scorer, logs ``val/f1`` (the mean of the
task scores, what early stopping watches), ``val/f1_NER`` ``val/f1_RE`` ``val/f1_EE``, the parse-failure and
truncation rates, and prints a small table of sample predictions.  ``test`` and ``predict`` keep an
:class:`~prouie_pl.results.EvalResult` in ``last_result`` and write it to ``predictions.jsonl`` (the format
``evaluate`` reads) and ``report.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import torch

from ..results import EvalResult


def _gather(items: list) -> list:
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, items)
        return [x for p in parts for x in p]
    return items


def cap_below_gold(records, fmt: str, tokenizer, max_new_tokens: int, split: str = "test") -> Optional[str]:
    """A message naming the data sets whose gold answers (``fmt``, with the answer's end token) exceed
    ``max_new_tokens``, with the figures; None when the cap holds every gold answer."""
    from ..chat import answer_ids
    from ..formats import render_target

    lengths: dict = {}
    for rec in records:
        lengths.setdefault(f"{rec.task}/{rec.dataset}", []).append(len(answer_ids(tokenizer, render_target(rec, fmt))))
    over = {ds: v for ds, v in lengths.items() if max(v) > max_new_tokens}
    if not over:
        return None
    parts = [f"{ds}: {sum(n > max_new_tokens for n in v)} of {len(v)} (gold mean {sum(v) / len(v):.0f}, max {max(v)} tokens)"
             for ds, v in over.items()]
    need = max(max(v) for v in over.values())
    return (f"model.generation.max_new_tokens={max_new_tokens} is shorter than {fmt}-format gold answers of the {split} "
            f"split, which will be cut and count as parse failures: {'; '.join(parts)}. Raise it to at least {need}.")


class GenerationEvaluator(L.Callback):
    """Scores decoded outputs; writes predictions and reports for test and predict.

    Args:
        output_dir: where test/predict write ``predictions.jsonl`` and ``report.json`` (default: the trainer's
            ``default_root_dir``).
        sample_rows: how many sample predictions the validation table shows (0: none).
        mode: scorer mode, ``strict`` or ``instructuie``.
    """

    def __init__(self, output_dir: Optional[str] = None, sample_rows: int = 4, mode: str = "strict"):
        self.output_dir = output_dir
        self.sample_rows = sample_rows
        self.mode = mode
        self._rows: list = []
        self.last_result: Optional[EvalResult] = None  # of the latest validation, test or predict epoch
        self._dev_cap_checked = False

    @property
    def last_report(self) -> Optional[dict]:
        return None if self.last_result is None else self.last_result.report

    # ------------------------------------------------------------------ the token cap against the gold

    def _check_cap(self, trainer, pl_module, records_attr: str, split: str) -> None:
        """Warn when ``generation.max_new_tokens`` is below gold answers of the records about to be decoded
        (the data module's ``records_attr``): such answers are cut however good the model is, and count as parse
        failures."""
        data = getattr(trainer, "datamodule", None)
        records = getattr(data, records_attr, None)
        settings = getattr(pl_module, "generation_settings", None)
        if not records or settings is None or getattr(data, "format", None) is None or not trainer.is_global_zero:
            return
        message = cap_below_gold(records, data.format, pl_module.tokenizer, settings.max_new_tokens, split)
        if message:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(message)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and not self._dev_cap_checked:  # the dev records are the same every time
            self._dev_cap_checked = True
            self._check_cap(trainer, pl_module, "val_records", "dev")

    def on_test_start(self, trainer, pl_module) -> None:
        self._check_cap(trainer, pl_module, "test_records", "test")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._check_cap(trainer, pl_module, "predict_records", getattr(trainer.datamodule, "predict_split", "predict"))

    # ------------------------------------------------------------------ collection

    def _reset(self, *args) -> None:
        self._rows = []

    on_validation_epoch_start = _reset
    on_test_epoch_start = _reset
    on_predict_epoch_start = _reset

    def _collect(self, outputs) -> None:
        if not outputs:
            return
        scores = outputs.get("unit_scores") or [None] * len(outputs["outputs"])
        looped = outputs.get("looped") or [False] * len(outputs["outputs"])
        for rec, out, cut, sc, loop in zip(outputs["records"], outputs["outputs"], outputs["truncated"], scores, looped):
            self._rows.append((rec, out, cut, sc, loop))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    # ------------------------------------------------------------------ scoring

    def _score(self, split: Optional[str] = None) -> tuple[EvalResult, list]:
        rows = _gather(list(self._rows))
        rows.sort(key=lambda x: (x[0].task, x[0].dataset, x[0].index))
        self.last_result = EvalResult.score(rows, self.mode, split)
        return self.last_result, [row[:3] for row in rows]

    def _log(self, pl_module, prefix: str, result: EvalResult) -> None:
        n = max(1, result.n)
        pl_module.log(f"{prefix}/f1", float(result.overall_f1), prog_bar=True, sync_dist=False)
        for task, f1 in result.task_scores.items():
            pl_module.log(f"{prefix}/f1_{task}", float(f1), sync_dist=False)
        pl_module.log(f"{prefix}/parse_failure_rate", result.parse_failures / n, sync_dist=False)
        pl_module.log(f"{prefix}/truncated_rate", result.truncated / n, sync_dist=False)
        pl_module.log(f"{prefix}/looped_rate", result.looped / n, sync_dist=False)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        result, rows = self._score()
        self._log(pl_module, "val", result)
        if trainer.is_global_zero and self.sample_rows:
            self._print_samples(rows, result.report, trainer)

    def _print_samples(self, rows: list, report: dict, trainer) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"validation samples (epoch {trainer.current_epoch}, step {trainer.global_step}, F1 {report['overall_f1']:.1f})", show_lines=True)
        table.add_column("data set")
        table.add_column("text", max_width=50)
        table.add_column("prediction", max_width=60)
        by_ds: dict = {}
        for rec, out, _ in rows:
            by_ds.setdefault((rec.task, rec.dataset), []).append((rec, out))
        shown = 0
        per = max(1, self.sample_rows // max(1, len(by_ds)))
        for (task, ds), items in by_ds.items():
            for rec, out in items[:per]:
                if shown >= self.sample_rows:
                    break
                table.add_row(f"{task}/{ds}", rec.sentence, out)
                shown += 1
        Console().print(table)

    # ------------------------------------------------------------------ test / predict files

    def _folder(self, trainer) -> Path:
        return Path(self.output_dir or trainer.default_root_dir)

    def _write(self, trainer, split: str) -> EvalResult:
        result, _ = self._score(split)
        if trainer.is_global_zero:
            preds, report = result.write(self._folder(trainer))
            from ..evaluate import print_report

            print_report(result.report, title=f"{split} split")
            print(f"wrote {preds} and {report}")
        return result

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(pl_module, "test", self._write(trainer, "test"))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        split = getattr(trainer.datamodule, "predict_split", "test") if getattr(trainer, "datamodule", None) is not None else "test"
        self._write(trainer, split)
