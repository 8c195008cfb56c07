"""Lightning callbacks: curriculum advance, generation-based evaluation, adapter export."""

from .adapter_export import AdapterExport
from .checkpoints import RankConsistencyCheck, StageCheckpoint
from .curriculum import CurriculumCallback
from .generation_eval import GenerationEvaluator

__all__ = ["AdapterExport", "CurriculumCallback", "GenerationEvaluator", "RankConsistencyCheck", "StageCheckpoint"]
