"""LightningDataModules: reading, curriculum phases, sampling, tokenisation and collation."""

from .curriculum import SCHEDULES, Curriculum, Phase
from .uie import UIEDataModule, resolve_data_dir

__all__ = ["UIEDataModule", "Curriculum", "Phase", "SCHEDULES", "resolve_data_dir"]
