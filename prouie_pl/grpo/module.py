"""``GRPOModule``: the Deep Exploration stage, GRPO with stepwise fine-grained rewards.

One training step, composed of separate pieces:

1. rollout (:mod:`.rollout`): G sampled completions for each of the P prompts of the batch, one ``generate``;
2. reward (:mod:`prouie_pl.rewards`): SFR steps per completion (unit rewards at the tokens where units end,
   a final format + recall step) and the outcome reward (F1 + format term);
3. advantage (:mod:`prouie_pl.kernels`): ``stepwise`` (default) normalises all step rewards of a group
   together and gives each token the sum of the normalised rewards of the steps ending at or after it;
   ``outcome`` normalises the outcome rewards within the group, one value for every token;
4. ``num_iterations`` update passes over the rollouts; with more than one, the log-probs of the sampling
   policy are kept as ``old``; ``grpo_loss`` (clipped surrogate, k3 KL to the reference when ``beta > 0``, the
   reference being the same model with the LoRA adapter disabled), backward in micro-batches, one optimizer
   step per pass.

Departures from the paper and from TRL, on purpose:

* the reference policy is the base without the adapter (no second model in memory), as in TRL's PEFT path;
* with ``beta = 0`` on a single device, completions whose advantages are all zero (a group with no reward
  spread) are left out of the backward pass: their loss and gradient are exactly zero, and the loss is still
  normalised over the whole batch, so the update is the same;
* log-probabilities come from the decoder's hidden states through a chunked LM head
  (:func:`~prouie_pl.kernels.linear_token_logprobs`) only at completion positions, never the full logits.

Raises ``ValueError`` when ``num_generations < 2`` or ``micro_batch_size`` does not divide the completions of
a step (``data.batch_size x model.rollout.num_generations``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Literal, Optional

import torch

from ..kernels import group_advantages, grpo_loss, stepwise_advantages
from ..kernels.reference import LOSS_TYPES
from ..modeling import BaseModelSettings, LoRASettings
from ..optim import OPTIMIZERS, make_optimizer, warmup_constant
from ..rewards import RewardSettings, completion_token_ends, sfr_reward
from ..uie_module import GenerationSettings, UIEModule
from .logprobs import completion_logprobs
from .rollout import RolloutSettings, generate_rollouts

ADVANTAGE_MODES = ("stepwise", "outcome")


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
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.max_grad_norm = max_grad_norm
        self.optimizer_name = optimizer
        self.reference_passes = 0  # counted so tests can check that beta = 0 runs none
        self.last_step_stats: dict = {}

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
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_constant(self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ pieces

    @contextmanager
    def _timed(self, times: dict, key: str):
        t0 = time.perf_counter()
        yield
        times[key] = times.get(key, 0.0) + time.perf_counter() - t0

    def compute_rewards(self, rollout, records) -> list:
        tok = self.tokenizer
        out = []
        lengths = rollout.lengths.tolist()
        ids = rollout.completion_ids.tolist()
        for i, rec in enumerate(records):
            toks = ids[i][: lengths[i]]
            text, ends = completion_token_ends(tok, toks)
            out.append(sfr_reward(text, ends, rec, self.reward_settings, n_tokens=len(toks)))
        return out

    def compute_advantages(self, results: list, rollout) -> torch.Tensor:
        """[N, L] per-token advantages."""
        g = self.rollout_settings.num_generations
        n, length = rollout.completion_ids.shape
        device = rollout.completion_ids.device
        if self.advantage_mode == "outcome":
            rewards = torch.tensor([r.outcome for r in results], dtype=torch.float32, device=device)
            adv = group_advantages(rewards, g, scale=self.scale_rewards)
            return adv.unsqueeze(1).expand(n, length).contiguous()
        s = max(len(r.steps) for r in results)
        step_rewards = torch.zeros(n, s, dtype=torch.float32)
        step_ends = torch.zeros(n, s, dtype=torch.long)
        step_mask = torch.zeros(n, s, dtype=torch.bool)
        for i, r in enumerate(results):
            for j, (end, val) in enumerate(r.steps):
                step_rewards[i, j], step_ends[i, j], step_mask[i, j] = val, end, True
        return stepwise_advantages(step_rewards.to(device), step_ends.to(device), step_mask.to(device), g, length)

    def _logprobs(self, rollout, rows: slice) -> torch.Tensor:
        return completion_logprobs(self.model, rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows],
                                   rollout.completion_mask[rows], self.rollout_settings.temperature)

    @torch.no_grad()
    def _logprobs_no_grad(self, rollout, chunks: list[slice], reference: bool) -> torch.Tensor:
        outs = []
        ctx = self.model.disable_adapter() if reference else nullcontext()
        with ctx:
            for rows in chunks:
                outs.append(self._logprobs(rollout, rows))
        if reference:
            self.reference_passes += 1
        return torch.cat(outs, dim=0)

    def _chunks(self, n: int) -> list[slice]:
        size = self.micro_batch_size or n
        return [slice(i, min(n, i + size)) for i in range(0, n, size)]

    def _backward_sync(self, last: bool):
        """Under DDP, gradients are reduced once per optimizer step: by DDP, in the last backward of the pass.

        Lightning prepares DDP's reducer on every ``manual_backward``, so without this each micro-batch would
        all-reduce the gradients again."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        if last or strategy is None or not hasattr(strategy, "block_backward_sync"):
            return nullcontext()
        return strategy.block_backward_sync()

    # ------------------------------------------------------------------ the step

    def training_step(self, batch: dict, batch_idx: int):
        opt = self.optimizers()
        sched = self.lr_schedulers()
        times: dict[str, float] = {}
        t_step = time.perf_counter()
        g = self.rollout_settings.num_generations
        records = [r for r in batch["records"] for _ in range(g)]

        with self._timed(times, "generate"):
            rollout = generate_rollouts(self.model, self.tokenizer, batch["input_ids"], batch["attention_mask"], self.rollout_settings)
        with self._timed(times, "reward"):
            results = self.compute_rewards(rollout, records)
            advantages = self.compute_advantages(results, rollout)
        n, length = rollout.completion_ids.shape
        mask = rollout.completion_mask
        row_has_signal = (advantages.abs() * mask).sum(dim=1) > 0
        group_has_signal = row_has_signal.view(-1, g).any(dim=1)

        world = self.trainer.world_size if self._trainer is not None else 1
        chunks_all = self._chunks(n)
        ref_lp = old_lp = None
        with self._timed(times, "reference"):
            if self.beta > 0:
                ref_lp = self._logprobs_no_grad(rollout, chunks_all, reference=True)
            if self.num_iterations > 1:
                old_lp = self._logprobs_no_grad(rollout, chunks_all, reference=False)

        # which completions go through the backward pass
        skip_ok = self.skip_zero_advantage and self.beta == 0 and world == 1
        active = row_has_signal if skip_ok else torch.ones(n, dtype=torch.bool, device=mask.device)
        total_tokens = float(mask.sum())
        metrics_acc: dict[str, float] = defaultdict(float)
        losses = []
        with self._timed(times, "policy"):
            for _ in range(self.num_iterations):
                opt.zero_grad()
                idx = active.nonzero().flatten()
                size = self.micro_batch_size or max(1, len(idx))
                starts = range(0, len(idx), size)
                for start in starts:
                    rows = idx[start:start + size]
                    lp = completion_logprobs(self.model, rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows], mask[rows], self.rollout_settings.temperature)
                    m = mask[rows]
                    loss, metrics = grpo_loss(
                        lp, None if old_lp is None else old_lp[rows], None if ref_lp is None else ref_lp[rows], advantages[rows], m,
                        eps_low=self.epsilon_low, eps_high=self.epsilon_high, beta=self.beta, loss_type=self.loss_type,
                        max_completion_length=length,
                    )
                    tokens = float(m.sum())
                    weight = tokens / max(total_tokens, 1.0) if self.loss_type in ("bnpo", "dapo") else len(rows) / n
                    with self._backward_sync(last=start == starts[-1]):
                        self.manual_backward(loss * weight)
                    losses.append(float(loss.detach()) * weight)
                    for k, v in metrics.items():
                        metrics_acc[k] += float(v) * tokens / max(total_tokens, 1.0) / self.num_iterations
                if self.max_grad_norm and self.max_grad_norm > 0:
                    self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                sched.step()
        times["step"] = time.perf_counter() - t_step
        self._log_step(results, batch["records"], rollout, group_has_signal, metrics_acc, sum(losses) / self.num_iterations, times)
        return None

    # ------------------------------------------------------------------ logging

    def _log_step(self, results, prompt_records, rollout, group_has_signal, metrics, loss, times) -> None:
        g = self.rollout_settings.num_generations
        outcomes = torch.tensor([r.outcome for r in results])
        bs = len(results)
        log = {
            "train/loss": loss,
            "train/reward": float(outcomes.mean()),
            "train/reward_std": float(outcomes.std()) if len(outcomes) > 1 else 0.0,
            "train/f1": float(sum(r.f1 for r in results) / bs),
            "train/zero_spread_groups": float(1.0 - group_has_signal.float().mean()),
            "train/completion_length": float(rollout.lengths.float().mean()),
            "train/truncated_share": float(rollout.truncated.float().mean()),
            "train/parse_ok_share": float(sum(r.parsed_ok for r in results) / bs),
            "train/clip_ratio": metrics.get("clip_ratio", 0.0),
            "train/kl": metrics.get("kl", 0.0),
            "train/completions_per_s": bs / max(times["step"], 1e-9),
            "train/lr": self.lr_schedulers().get_last_lr()[0],
        }
        by_task: dict[str, list[float]] = defaultdict(list)
        for i, r in enumerate(results):
            by_task[prompt_records[i // g].task].append(r.outcome)
        for task, vals in by_task.items():
            t = torch.tensor(vals)
            log[f"train/reward_{task}"] = float(t.mean())
            log[f"train/reward_std_{task}"] = float(t.std()) if len(vals) > 1 else 0.0
        correct, predicted = defaultdict(int), defaultdict(int)
        for r in results:
            for k, v in r.correct.items():
                correct[k] += v
            for k, v in r.predicted.items():
                predicted[k] += v
        for kind, p in predicted.items():
            log[f"train/precision_{kind}"] = correct[kind] / p if p else 0.0
        for k, v in times.items():
            log[f"time/{k}"] = v
        log["time/outside_generate_share"] = 1.0 - times["generate"] / max(times["step"], 1e-9)
        self.last_step_stats = log
        self.log_dict(log, prog_bar=False, batch_size=bs)
        self.log("reward", log["train/reward"], prog_bar=True, logger=False, batch_size=bs)

