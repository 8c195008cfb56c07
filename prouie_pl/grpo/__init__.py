"""The Deep Exploration stage: GRPO with stepwise fine-grained rewards (rollout, reward, advantage, loss)."""

from .module import GRPOModule
from .rollout import Rollout, RolloutSettings, generate_rollouts
from .stats import StepStats
from .trajectory import Trajectory

__all__ = ["GRPOModule", "Rollout", "RolloutSettings", "StepStats", "Trajectory", "generate_rollouts"]
