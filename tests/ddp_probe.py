"""A callback for the DDP tests: counts how often the gradients of each optimizer step are reduced across ranks.

It wraps DDP's bucket all-reduce (a communication hook that counts, then runs the default all-reduce) and
``torch.distributed.all_reduce`` itself, and writes per step, per rank, which gradient buckets were reduced and
how many direct all-reduce calls of gradient size were made, to ``reductions_rank<r>.json`` in ``default_root_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch


class GradientReductionCounter(L.Callback):
    def __init__(self):
        self.buckets: list[int] = []
        self.direct = 0
        self.steps: list[dict] = []
        self._all_reduce = None
        self._in_hook = False

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        model = trainer.strategy.model
        assert isinstance(model, DistributedDataParallel), type(model)

        def counting_hook(state, bucket):
            self.buckets.append(bucket.index())
            self._in_hook = True  # the default hook's own all_reduce call is this bucket's reduction
            try:
                return allreduce_hook(state, bucket)
            finally:
                self._in_hook = False

        model.register_comm_hook(None, counting_hook)
        self._all_reduce = torch.distributed.all_reduce

        n_trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)

        def counting_all_reduce(tensor, *args, **kwargs):
            # Lightning also all-reduces small flags (stop decisions); only a gradient-sized tensor is a reduction
            if tensor.numel() >= n_trainable and not self._in_hook:
                self.direct += 1
            return self._all_reduce(tensor, *args, **kwargs)

        torch.distributed.all_reduce = counting_all_reduce

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps.append({"buckets": list(self.buckets), "direct_all_reduce": self.direct})
        self.buckets, self.direct = [], 0

    def on_train_end(self, trainer, pl_module):
        if self._all_reduce is not None:
            torch.distributed.all_reduce = self._all_reduce
        out = Path(trainer.default_root_dir) / f"reductions_rank{trainer.global_rank}.json"
        out.write_text(json.dumps(self.steps) + "\n")
