"""Lightning callbacks: curriculum advance and curriculum-aware early stopping, generation-based evaluation,
adapter export, stage cost, token throughput."""

from .adapter_export import AdapterExport
from .checkpoints import RankConsistencyCheck, StageCheckpoint
from .curriculum import CurriculumCallback, CurriculumEarlyStopping, PhaseListener
from .generation_eval import GenerationEvaluator
from .progress import StageProgress
from .stage_cost import StageCost
from .throughput import TokenThroughput

__all__ = ["AdapterExport", "CurriculumCallback", "CurriculumEarlyStopping", "GenerationEvaluator", "PhaseListener",
           "RankConsistencyCheck", "StageCheckpoint", "StageCost", "StageProgress", "TokenThroughput"]
