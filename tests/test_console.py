"""The command line's console: third-party messages a user cannot act on are dropped, one by one, and
nothing else; training starts with no module in eval mode."""

from __future__ import annotations

import logging
import warnings

from training_helpers import QUIET_TRAINER, stage_config


def record(logger: str, message: str, level=logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(logger, level, __file__, 1, message, None, None)


def test_only_the_named_third_party_messages_are_dropped():
    from prouie_pl.console import quiet_third_party

    quiet_third_party()
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert not bnb.filter(record(bnb.name, "Failed to load CPU gemm_4bit_forward from kernels-community: offline. Please ..."))
    assert bnb.filter(record(bnb.name, "some other bitsandbytes warning"))
    assert bnb.filter(record(bnb.name, "CUDA error: out of memory", logging.ERROR))
    rz = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert not rz.filter(record(rz.name, "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]", logging.INFO))
    assert not rz.filter(record(rz.name, "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
                                logging.INFO))
    assert rz.filter(record(rz.name, "GPU available: False, used: False", logging.INFO))
    with warnings.catch_warnings(record=True) as seen:
        quiet_third_party()  # as the command line does, inside whatever filter state the caller has
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", UserWarning)
        warnings.warn("Starting from v1.9.0, `tensorboardX` has been removed as a dependency of the `lightning.pytorch` package")
        warnings.warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization state "
                      "was saved. The checkpoint will contain the model state AFTER optimization.", UserWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
    from transformers.utils import logging as hf_logging

    assert not hf_logging.is_progress_bar_enabled()


def test_fit_finds_no_module_in_eval_mode(tmp_path):
    from prouie_pl.cli import main

    cfg = stage_config("cm", tmp_path / "cm.yaml", **{"trainer.max_steps": 1, "trainer.max_epochs": 1, "data.max_train_records": 8,
                                          "data.max_val_records": 0, "trainer.limit_val_batches": 0, **QUIET_TRAINER,
                                          "trainer.default_root_dir": str(tmp_path / "run")})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["fit", "--config", str(cfg)]) == 0
    assert not [w for w in seen if "in eval mode at the start of training" in str(w.message)]
