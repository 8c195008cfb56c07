"""A quiet console for the command line: third-party messages a user cannot act on are dropped at the source.

Each filter names one message, so everything else (errors above all) still gets through:

* bitsandbytes, on a CPU with AVX512-BF16, tries at import to fetch an optional 4-bit kernel from the Hugging
  Face hub and logs a warning when it cannot (offline, or the publisher check fails); it then uses its own CPU
  kernels.  The ``kernels`` package logs the failed hub lookup as well.
* Lightning prints advertisements for its cloud services: the model registry when a checkpoint callback is set
  up, the experiment platform when the default logger is.
* transformers warns (``FutureWarning``) that ``is_gradient_checkpointing`` is deprecated when PEFT reads it
  while wrapping the model; Lightning's own pytree helper warns that ``LeafSpec`` checks are deprecated.  Both
  come from those libraries' code, not from anything a config can change.
* Lightning warns that ``tensorboardX`` is no longer one of its dependencies whenever the default logger is
  set up; the project logs to CSV on purpose, so there is nothing to install.
* transformers draws a "Loading weights" progress bar for a checkpoint that loads in a second; the command
  line prints its own progress per stage.

Library users (``import prouie_pl``) keep their logging and warnings untouched: only the command line calls
:func:`quiet_third_party`.
"""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a record that cannot be formatted is not ours to judge
            return True
        return not any(text.startswith(s) or s in text for s in self.starts)


_INSTALLED = False


def quiet_third_party() -> None:
    """Install the targeted filters: the logging ones once per process, the warning filters on every call
    (``warnings.catch_warnings`` blocks, pytest's among them, restore the filter list when they end)."""
    global _INSTALLED
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Starting from v1\.9\.0, `tensorboardX` has been removed as a dependency")
    # GRPO steps its optimizer by hand; a checkpoint written after step N holds the weights, optimizer and loop
    # position after step N, which is what resuming at step N + 1 needs.  Lightning's alternative (a
    # ``saved_models`` dict of pre-step states on the module) would restore a state the loop has moved past.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
    if _INSTALLED:
        return
    _INSTALLED = True
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # transformers missing: the command that needs it says so itself
        pass
    hub_kernel = _DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community")
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(hub_kernel)
    logging.getLogger("kernels._internals.hf_hub").addFilter(
        _DropMessages("Skipping publisher trust check for 'kernels-community/", "kernels-community/quantization-bitsandbytes"))
    tip = _DropMessages("💡 Tip: For seamless cloud uploads and versioning", "💡 Tip: For seamless cloud logging and experiment tracking")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(tip)
