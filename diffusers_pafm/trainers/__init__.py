"""Trainers: one accelerate engine (:class:`Trainer`) and the methods built on it."""

from .engine import GlobalBatchSampler, Trainer, TrainingConfig, TrainingResult
from .pafm import PAFMTrainer, PAFMTrainingConfig

__all__ = ["Trainer", "TrainingConfig", "TrainingResult", "GlobalBatchSampler", "PAFMTrainer", "PAFMTrainingConfig"]
