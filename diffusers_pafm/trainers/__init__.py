"""Trainers: one accelerate engine (:class:`Trainer`) and the methods built on it.

Each config is composed from parts: :class:`TrainingConfig` (the loop), :class:`DataConfig` (the data) and the
method's own part (PAFM's objective, :class:`FlowMapConfig`, :class:`VFMConfig`, :class:`RewardConfig`).
"""

from ..data import DataConfig
from .engine import GlobalBatchSampler, Trainer, TrainingConfig, TrainingResult
from .meanflow import FlowMapConfig, MeanFlowTrainer, MeanFlowTrainingConfig
from .pafm import PAFMTrainer, PAFMTrainingConfig
from .reward import RewardConfig, RewardTrainer, RewardTrainingConfig
from .vfm import VFMConfig, VFMTrainer, VFMTrainingConfig

__all__ = [
    "Trainer",
    "TrainingConfig",
    "DataConfig",
    "TrainingResult",
    "GlobalBatchSampler",
    "PAFMTrainer",
    "PAFMTrainingConfig",
    "FlowMapConfig",
    "MeanFlowTrainer",
    "MeanFlowTrainingConfig",
    "VFMConfig",
    "VFMTrainer",
    "VFMTrainingConfig",
    "RewardConfig",
    "RewardTrainer",
    "RewardTrainingConfig",
]
