"""Flow maps u(x_t, t, r) and what trains or uses them: MeanFlow, one-step distillation, the VFM objective, the
degradation operators of inverse problems, and the DPS-style guided baseline."""

from .distillation import OneStepDistillation, one_step_distillation_loss
from .flow_map import AverageVelocity, FlowMapModel, one_step, sample_flow_map
from .guidance import dps_sample, reward_guided_sample
from .meanflow import DERIVATIVE_MODES, MeanFlowLoss, MeanFlowLossOutput, TwoTimeSampler, meanflow_target
from .operators import OPERATORS, DegradationOperator, MatrixOperator, Measurement, build_operator
from .vfm import DataTerm, ObservationTerm, RewardTerm, VFMLoss, VFMLossOutput, check_reward, stop_gradient

__all__ = [
    "AverageVelocity",
    "FlowMapModel",
    "one_step",
    "sample_flow_map",
    "TwoTimeSampler",
    "DERIVATIVE_MODES",
    "MeanFlowLoss",
    "MeanFlowLossOutput",
    "meanflow_target",
    "OneStepDistillation",
    "one_step_distillation_loss",
    "DegradationOperator",
    "OPERATORS",
    "build_operator",
    "MatrixOperator",
    "Measurement",
    "VFMLoss",
    "VFMLossOutput",
    "DataTerm",
    "ObservationTerm",
    "RewardTerm",
    "check_reward",
    "stop_gradient",
    "dps_sample",
    "reward_guided_sample",
]
