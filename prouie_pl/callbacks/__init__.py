"""Lightning callbacks: curriculum advance, generation-based evaluation, adapter export, stage cost."""

from .adapter_export import AdapterExport
from .checkpoints import RankConsistencyCheck, StageCheckpoint
from .curriculum import CurriculumCallback
from .generation_eval import GenerationEvaluator
from .stage_cost import StageCost

__all__ = ["AdapterExport", "CurriculumCallback", "GenerationEvaluator", "RankConsistencyCheck", "StageCheckpoint", "StageCost"]
