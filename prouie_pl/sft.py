"""``SFTModule``: supervised fine-tuning for the Complete Modeling and Streamlined Alignment stages.

Causal-LM loss on the answer tokens only (the data module masks the prompt), normalised by the answer tokens
of the whole optimizer step (every micro-batch of a gradient-accumulation window, every rank), so each answer
token weighs the same however the step is split; the decoder runs for hidden
states and :func:`prouie_pl.kernels.linear_token_logprobs` applies the LM head only at answer positions, in
chunks, so the ``[batch, length, vocabulary]`` logits tensor is never built.  AdamW (or bitsandbytes' paged
8-bit AdamW) with linear warm-up and cosine decay to a floor, over the optimizer steps the run plans
(:func:`prouie_pl.wiring.connect` passes the plan in) or over ``trainer.max_time`` when that ends the stage first
(:mod:`prouie_pl.optim`).  Logs loss, answer tokens and padding share;
throughput and learning rate come from Lightning's ``ThroughputMonitor`` (:class:`prouie_pl.callbacks.TokenThroughput`)
and ``LearningRateMonitor`` (the schedule is named ``train/lr``) where a config lists them.  Starts from an earlier stage's adapter with ``model.lora.init_adapter`` (SA from CM).

Raises ``ValueError`` for an unknown optimizer or a warm-up outside [0, 1).
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch

from .kernels.reference import IGNORE_INDEX
from .kernels import linear_token_logprobs
from .modeling import BaseModelSettings, LoRASettings, decoder_and_head
from .shared_prefix import answer_nll_shared_head
from .optim import OPTIMIZERS, make_optimizer, trainer_clock, warmup_cosine_schedule
from .uie_module import GenerationSettings, UIEModule

def answer_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the answer tokens, and how many there were."""
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]
    lp = linear_token_logprobs(h, head.weight, targets[keep], bias=head.bias)
    return -lp.sum(), int(keep.sum())


def answer_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean negative log-likelihood of the answer tokens, and how many there were."""
    nll, n = answer_nll(model, input_ids, attention_mask, labels)
    return nll / max(n, 1), n


class SFTModule(UIEModule):
    """Supervised fine-tuning of LoRA adapters on the answer tokens.

    Args:
        base: the frozen base model (``model.base.*``).
        lora: LoRA adapters (``model.lora.*``); ``init_adapter`` starts from an earlier stage.
        generation: greedy decoding for evaluation.
        learning_rate: peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_ratio: share of the planned optimizer steps spent in linear warm-up.
        min_lr_ratio: floor of the cosine decay as a share of the peak.
        optimizer: ``adamw`` or ``paged_adamw_8bit`` (bitsandbytes).
        shared_head: run the token prefix all rows of a batch share (the prompt head of one data set and format)
            once, and the rest of every row on its KV cache (:mod:`prouie_pl.shared_prefix`): the same loss and
            gradients as the per-row path (``false``, the default), in less time.  Off by default: equal per step
            to float rounding, but over a 100-epoch memorisation run (``tests/test_sft.py``) the rounding
            differences led to a different end (one of 12 NER sentences wrong), so it waits for a long-run check.
    """

    def __init__(
        self,
        base: Optional[BaseModelSettings] = None,
        lora: Optional[LoRASettings] = None,
        generation: Optional[GenerationSettings] = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw",
        shared_head: bool = False,
    ):
        super().__init__(base, lora, generation)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"model.optimizer must be one of {', '.join(OPTIMIZERS)}, not {optimizer!r}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"model.warmup_ratio must lie in [0, 1), not {warmup_ratio}")
        self.save_hyperparameters()
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_ratio = warmup_ratio
        self.min_lr_ratio = min_lr_ratio
        self.optimizer_name = optimizer
        self.shared_head = shared_head
        # the optimizer steps the LR schedule spans, asked for when the optimizer is built (after the data are set
        # up); prouie_pl.wiring.connect gives it; without it, Lightning's estimate
        self.schedule_steps: Optional[Callable[[], int]] = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss_fn = answer_nll_shared_head if self.shared_head else answer_nll
        nll, n_answer = loss_fn(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.log("train/loss", nll.detach() / max(n_answer, 1), prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/answer_tokens", float(n_answer), reduce_fx="sum", batch_size=1)
        step_tokens = batch.get("step_answer_tokens")
        if step_tokens is None:  # a loader without step weights: the token mean of this micro-batch
            return nll / max(n_answer, 1)
        # Every answer token of the optimizer step weighs the same, whatever micro-batch or rank holds it:
        # Lightning divides the returned loss by accumulate_grad_batches and DDP averages over ranks, so
        # scale the sum by both and divide by the answer tokens of the whole step (all micro-batches, all ranks).
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size if self._trainer is not None else 1
        return nll * scale / max(int(step_tokens), 1)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        mask = batch["attention_mask"]
        self.log("train/padding_share", 1.0 - float(mask.sum()) / mask.numel(), batch_size=1)

    def configure_optimizers(self):
        opt = make_optimizer(self.parameters(), self.optimizer_name, self.learning_rate, self.betas, self.weight_decay)
        total = max(1, self.schedule_steps() if self.schedule_steps is not None else int(self.trainer.estimated_stepping_batches))
        # a stage that trainer.max_time ends early still decays to its floor (prouie_pl.optim)
        sched = warmup_cosine_schedule(opt, total, self.warmup_ratio, self.min_lr_ratio, trainer_clock(self.trainer))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "train/lr"}}
