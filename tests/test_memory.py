"""Resident memory on a CPU: the heap is trimmed after every training batch and between pipeline stages, and
the helpers read what they say."""

from __future__ import annotations

import sys

import pytest

from training_helpers import QUIET_TRAINER, stage_config


def test_rss_helpers_read_the_process():
    from prouie_pl.memory import peak_rss_mb, rss_mb, trim_heap

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/statm and glibc's malloc_trim: Linux only")
    now, peak = rss_mb(), peak_rss_mb()
    # torch is imported: tens of MB at least; the kernel syncs its counters lazily, so allow a few MB either way
    assert 20 < now <= peak + 16
    # the same figure as the kernel's own report in another file, read another way
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    vm_rss_mb = int(status["VmRSS"].split()[0]) / 1024
    assert abs(rss_mb() - vm_rss_mb) < 16
    assert abs(peak_rss_mb() - int(status["VmHWM"].split()[0]) / 1024) < 16
    assert trim_heap(collect=True) is True


def test_training_trims_the_heap_once_it_has_grown_on_a_cpu(tmp_path, monkeypatch):
    import prouie_pl.uie_module as uie_module
    from prouie_pl.cli import main

    # resident set as a fake counter: batch 1 reads 3000 (first batch: trim, baseline 1500), batch 2 reads 2400
    # (+900 MB: kept), batch 3 reads 2600 (+1100 MB over the 1024 MB slack: trim, baseline 1600)
    readings = iter([3000, 1500, 2400, 2600, 1600])
    calls = []
    monkeypatch.setattr(uie_module, "rss_mb", lambda: next(readings))
    monkeypatch.setattr(uie_module, "trim_heap", lambda *a, **k: calls.append(1) or True)
    cfg = stage_config("cm", tmp_path / "cm.yaml", **{"trainer.max_steps": 3, "trainer.max_epochs": 1, "data.max_train_records": 24,
                                          "data.max_val_records": 0, "trainer.limit_val_batches": 0, **QUIET_TRAINER,
                                          "trainer.default_root_dir": str(tmp_path / "run")})
    assert main(["fit", "--config", str(cfg)]) == 0
    assert len(calls) == 2 and next(readings, None) is None  # batches 1 and 3, every reading used

    calls.clear()
    monkeypatch.setattr(uie_module.UIEModule, "heap_slack_mb", None)
    assert main(["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "run2")]) == 0
    assert calls == []
