"""Trainers: one accelerate engine (:class:`Trainer`) and the methods built on it."""

from .engine import DataConfig, GlobalBatchSampler, Trainer, TrainingConfig, TrainingResult
from .pafm import PAFMTrainer, PAFMTrainingConfig
from .vfm import VFMTrainer, VFMTrainingConfig

__all__ = [
    "Trainer",
    "TrainingConfig",
    "DataConfig",
    "TrainingResult",
    "GlobalBatchSampler",
    "PAFMTrainer",
    "PAFMTrainingConfig",
    "VFMTrainer",
    "VFMTrainingConfig",
]
