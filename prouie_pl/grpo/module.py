"""``GRPOModule``: the Deep Exploration stage, GRPO with stepwise fine-grained rewards.

A training step is the algorithm, one typed piece after another (:meth:`GRPOModule.training_step`):

1. rollout (:func:`.rollout.generate_rollouts`): G sampled completions for each of the P prompts of the batch,
   each prompt prefilled once;
2. reward (:func:`.rewarding.rollout_rewards`): SFR steps per completion (unit rewards at the tokens where units
   end, a final format + recall step) and the outcome reward (F1 + format term);
3. advantage (:func:`.advantages.token_advantages`): ``stepwise`` (default) normalises all step rewards of a
   group together and gives each token the sum of the normalised rewards of the steps ending at or after it;
   ``outcome`` normalises the outcome rewards within the group, one value for every token.  Steps 1-3 make a
   :class:`.trajectory.Trajectory`;
4. log-probs the loss compares against, without gradients: the reference's (the same model with the LoRA
   adapter disabled) when ``beta > 0``, the sampling policy's (``old``) when ``num_iterations > 1``;
5. ``num_iterations`` update passes: ``grpo_loss`` (clipped surrogate, k3 KL to the reference when
   ``beta > 0``) and backward over micro-batches (:func:`.trajectory.micro_batches`), gradients reduced once
   per pass under DDP, one optimizer step per pass;
6. one :class:`.stats.StepStats` logged (``train/*``, ``time/*``) and kept as ``last_step_stats``.

Departures from the paper and from TRL, on purpose:

* the reference policy is the base without the adapter (no second model in memory), as in TRL's PEFT path;
* with ``beta = 0`` on a single device, completions whose advantages are all zero (a group with no reward
  spread) are left out of the backward pass: their loss and gradient are exactly zero, and the loss is still
  normalised over the whole batch, so the update is the same;
* log-probabilities come from the decoder's hidden states through a chunked LM head
  (:func:`~prouie_pl.kernels.linear_token_logprobs`) only at completion positions, never the full logits;
* with ``policy_prefix: shared`` (the default) every pass (policy with gradients, reference, old policy) runs
  each distinct prompt of a micro-batch through the decoder once and its completions on top of its KV cache
  (:func:`prouie_pl.shared_prefix.grouped_completion_logprobs`): the same log-probs and gradients as running
  prompt + completion per row (``per_row``, kept for comparison), with the prompt computed once per group.

Raises ``ValueError`` when ``num_generations < 2`` or ``micro_batch_size`` does not divide the completions of
a step (``data.batch_size x model.rollout.num_generations``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal, Optional, Sequence

import torch

from ..kernels import grpo_loss
from ..kernels.reference import LOSS_TYPES
from ..modeling import BaseModelSettings, LoRASettings
from ..optim import OPTIMIZERS, make_optimizer
from ..rewards import RewardSettings
from ..schema import Record
from ..uie_module import GenerationSettings, UIEModule
from .advantages import ADVANTAGE_MODES, token_advantages
from .logprobs import completion_logprobs
from .rewarding import rollout_rewards
from .rollout import Rollout, RolloutSettings, generate_rollouts
from .stats import PassStats, PhaseTimer, StepStats
from .trajectory import Trajectory, micro_batches
from ..shared_prefix import group_owners, grouped_completion_logprobs

POLICY_PREFIX_MODES = ("shared", "per_row")


class GRPOModule(UIEModule):
    """GRPO with stepwise fine-grained rewards over structural units (manual optimisation).

    Args:
        base: the frozen base model.
        lora: LoRA adapters; ``init_adapter`` is the SA stage's adapter.
        generation: greedy decoding for validation and test.
        rollout: sampling of the G completions per prompt.
        reward: SFR reward settings.
        advantage: ``stepwise`` (process supervision over units) or ``outcome``.
        scale_rewards: ``outcome`` mode: divide by the ``group`` std, the ``batch`` std, or ``none``.
        num_iterations: update passes per batch of rollouts (old log-probs kept when above 1).
        beta: weight of the k3 KL to the reference policy (0: no reference pass).
        epsilon_low: lower clip range of the ratio.
        epsilon_high: upper clip range of the ratio.
        loss_type: aggregation: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo``.
        micro_batch_size: completions per forward/backward pass (None: all of a step at once).
        skip_zero_advantage: with ``beta = 0`` on one device, leave completions whose advantages are all zero
            out of the backward pass (their loss and gradient are exactly zero; the update is the same).
        policy_prefix: ``shared``: each prompt of a micro-batch runs once and its completions attend to its KV
            cache; ``per_row``: prompt + completion for every completion (same values, slower).
        learning_rate: learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: linear warm-up steps (then constant).
        max_grad_norm: gradient clipping norm (0: none).
        optimizer: ``adamw`` or ``paged_adamw_8bit``.
    """

    def __init__(
        self,
        base: Optional[BaseModelSettings] = None,
        lora: Optional[LoRASettings] = None,
        generation: Optional[GenerationSettings] = None,
        rollout: Optional[RolloutSettings] = None,
        reward: Optional[RewardSettings] = None,
        advantage: Literal["stepwise", "outcome"] = "stepwise",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        num_iterations: int = 1,
        beta: float = 0.0,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo",
        micro_batch_size: Optional[int] = None,
        skip_zero_advantage: bool = True,
        policy_prefix: Literal["shared", "per_row"] = "shared",
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        max_grad_norm: float = 1.0,
        optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw",
    ):
        super().__init__(base, lora, generation)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.rollout_settings = rollout or RolloutSettings()
        self.reward_settings = reward or RewardSettings()
        g = self.rollout_settings.num_generations
        if g < 2:
            raise ValueError(f"model.rollout.num_generations={g}: GRPO compares completions of one prompt, it needs at least 2")
        if advantage not in ADVANTAGE_MODES:
            raise ValueError(f"model.advantage must be one of {', '.join(ADVANTAGE_MODES)}, not {advantage!r}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"model.loss_type must be one of {', '.join(LOSS_TYPES)}, not {loss_type!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"model.optimizer must be one of {', '.join(OPTIMIZERS)}, not {optimizer!r}")
        if num_iterations < 1:
            raise ValueError(f"model.num_iterations must be >= 1, not {num_iterations}")
        if policy_prefix not in POLICY_PREFIX_MODES:
            raise ValueError(f"model.policy_prefix must be one of {', '.join(POLICY_PREFIX_MODES)}, not {policy_prefix!r}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"model.micro_batch_size must be >= 1, not {micro_batch_size}")
        self.advantage_mode = advantage
        self.scale_rewards = scale_rewards
        self.num_iterations = num_iterations
        self.beta = beta
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.micro_batch_size = micro_batch_size
        self.skip_zero_advantage = skip_zero_advantage
        self.policy_prefix = policy_prefix
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.max_grad_norm = max_grad_norm
        self.optimizer_name = optimizer
        self.reference_passes = 0  # counted so tests can check that beta = 0 runs none
        self.last_step: Optional[StepStats] = None

    @property
    def last_step_stats(self) -> dict:
        """What the last training step logged (``train/*``, ``time/*``); empty before the first step."""
        return self.last_step.as_log() if self.last_step is not None else {}

    # ------------------------------------------------------------------ checks and optimizer

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        prompts = getattr(dm, "batch_size", None)
        if dm is not None and getattr(dm, "stage", "de") != "de":
            raise ValueError(f"GRPOModule trains on prompts: set data.stage=de (it is {dm.stage!r})")
        if prompts and self.micro_batch_size:
            total = prompts * self.rollout_settings.num_generations
            if total % self.micro_batch_size:
                raise ValueError(
                    f"model.micro_batch_size={self.micro_batch_size} does not divide the {total} completions of a step "
                    f"(data.batch_size={prompts} x model.rollout.num_generations={self.rollout_settings.num_generations})"
                )

    def configure_optimizers(self):
        opt = make_optimizer(self.parameters(), self.optimizer_name, self.learning_rate, self.betas, self.weight_decay)
        from transformers import get_constant_schedule_with_warmup

        sched = get_constant_schedule_with_warmup(opt, self.warmup_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "train/lr"}}

    # ------------------------------------------------------------------ the step

    def training_step(self, batch: dict, batch_idx: int):
        clock = PhaseTimer()
        with clock("generate"):
            rollout = generate_rollouts(self.model, self.tokenizer, batch["input_ids"], batch["attention_mask"], self.rollout_settings)
        with clock("reward"):
            trajectory = self.make_trajectory(rollout, batch["records"])
        with clock("reference"):
            self.add_comparison_logprobs(trajectory)
        with clock("policy"):
            passes = [self.update_policy(trajectory) for _ in range(self.num_iterations)]
        stats = StepStats.collect(trajectory, batch["records"], passes, clock.finish(), lr=self.lr_schedulers().get_last_lr()[0])
        self.log_step(stats)
        return None

    # ------------------------------------------------------------------ pieces

    def make_trajectory(self, rollout: Rollout, prompt_records: Sequence[Record]) -> Trajectory:
        """Rewards and per-token advantages of the rollouts of ``prompt_records`` (one record per prompt)."""
        g = self.rollout_settings.num_generations
        records = [r for r in prompt_records for _ in range(g)]
        rewards = rollout_rewards(self.tokenizer, rollout, records, self.reward_settings)
        advantages = token_advantages(rewards, rollout.completion_mask, g, self.advantage_mode, self.scale_rewards)
        return Trajectory.from_rollout(rollout, rewards, advantages, g)

    def add_comparison_logprobs(self, trajectory: Trajectory) -> None:
        """The no-grad log-probs the loss compares the policy with: the reference's (``beta > 0``) and the
        sampling policy's (``num_iterations > 1``; the first pass would otherwise see ratio 1 only)."""
        chunks = micro_batches(trajectory.all_rows(), self.micro_batch_size)
        if self.beta > 0:
            trajectory.ref_logprobs = self._logprobs_no_grad(trajectory, chunks, reference=True)
        if self.num_iterations > 1:
            trajectory.old_logprobs = self._logprobs_no_grad(trajectory, chunks, reference=False)

    def backward_rows(self, trajectory: Trajectory) -> torch.Tensor:
        """Completions that go through the backward pass: all of them, or with ``skip_zero_advantage`` (only with
        ``beta = 0`` on one device) those with a non-zero advantage somewhere."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if self.skip_zero_advantage and self.beta == 0 and world == 1:
            return trajectory.rows_with_signal().nonzero().flatten()
        return trajectory.all_rows()

    def update_policy(self, trajectory: Trajectory) -> PassStats:
        """One update pass: :meth:`accumulate_policy_gradients`, clipping, one optimizer and scheduler step."""
        opt = self.optimizers()
        sched = self.lr_schedulers()
        opt.zero_grad()
        stats = self.accumulate_policy_gradients(trajectory)
        if self.max_grad_norm and self.max_grad_norm > 0:
            self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()
        return stats

    def accumulate_policy_gradients(self, trajectory: Trajectory) -> PassStats:
        """The batch loss as a sum of weighted micro-batch losses, one backward each (gradients reduced once, in
        the last); the gradients add to what the parameters hold."""
        stats = PassStats()
        total_tokens = max(trajectory.tokens, 1.0)
        batches = micro_batches(self.backward_rows(trajectory), self.micro_batch_size)
        for k, rows in enumerate(batches):
            mask = trajectory.completion_mask[rows]
            loss, metrics = grpo_loss(
                self._logprobs(trajectory, rows),
                None if trajectory.old_logprobs is None else trajectory.old_logprobs[rows],
                None if trajectory.ref_logprobs is None else trajectory.ref_logprobs[rows],
                trajectory.advantages[rows], mask,
                eps_low=self.epsilon_low, eps_high=self.epsilon_high, beta=self.beta, loss_type=self.loss_type,
                max_completion_length=trajectory.completion_length,
            )
            tokens = float(mask.sum())
            # bnpo and dapo normalise by the tokens of the whole batch, grpo and dr_grpo by its completions
            weight = tokens / total_tokens if self.loss_type in ("bnpo", "dapo") else len(rows) / trajectory.size
            with self._backward_sync(last=k == len(batches) - 1):
                if self._trainer is not None:
                    self.manual_backward(loss * weight)
                else:  # outside a fit (tests, benchmarks)
                    (loss * weight).backward()
            stats.loss += float(loss.detach()) * weight
            for name, value in metrics.items():
                stats.metrics[name] += float(value) * tokens / total_tokens
        return stats

    def _logprobs(self, trajectory: Trajectory, rows: torch.Tensor) -> torch.Tensor:
        if self.policy_prefix == "shared":
            first, owner = group_owners(rows, trajectory.group_size)
            return grouped_completion_logprobs(self.model, trajectory.prompt_ids[first], trajectory.prompt_mask[first], owner,
                                               trajectory.completion_ids[rows], trajectory.completion_mask[rows],
                                               self.rollout_settings.temperature)
        return completion_logprobs(self.model, trajectory.prompt_ids[rows], trajectory.prompt_mask[rows],
                                   trajectory.completion_ids[rows], trajectory.completion_mask[rows],
                                   self.rollout_settings.temperature)

    @torch.no_grad()
    def _logprobs_no_grad(self, trajectory: Trajectory, chunks: list[torch.Tensor], reference: bool) -> torch.Tensor:
        ctx = self.model.disable_adapter() if reference else nullcontext()
        with ctx:
            out = torch.cat([self._logprobs(trajectory, rows) for rows in chunks], dim=0)
        if reference:
            self.reference_passes += 1
        return out

    def _backward_sync(self, last: bool):
        """Under DDP, gradients are reduced once per optimizer step: by DDP, in the last backward of the pass.

        Lightning prepares DDP's reducer on every ``manual_backward``, so without this each micro-batch would
        all-reduce the gradients again."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        if last or strategy is None or not hasattr(strategy, "block_backward_sync"):
            return nullcontext()
        return strategy.block_backward_sync()

    # ------------------------------------------------------------------ logging

    def log_step(self, stats: StepStats) -> None:
        self.last_step = stats
        log = stats.as_log()
        self.log_dict(log, prog_bar=False, batch_size=stats.completions)
        self.log("reward", log["train/reward"], prog_bar=True, logger=False, batch_size=stats.completions)
