"""diffusers-pafm: Posterior-Augmented Flow Matching and Variational Flow Maps for Hugging Face diffusers.

One time convention everywhere (:mod:`diffusers_pafm.paths`): diffusers' sigma, x_t = (1 - t) x + t eps, t = 1 is
noise, v = eps - x, model timestep = 1000 t.

The top level holds what a user calls; every sub-package has its own ``__all__`` for the rest:

* :mod:`~diffusers_pafm.paths` - the probability path and every time conversion
* :mod:`~diffusers_pafm.pafm` - the PAFM objective family (batch type, posterior, candidates, likelihoods, loss)
* :mod:`~diffusers_pafm.flow_maps` - flow maps, MeanFlow, distillation, VFM, operators, the DPS baseline
* :mod:`~diffusers_pafm.models`, :mod:`~diffusers_pafm.pipelines`, :mod:`~diffusers_pafm.data`,
  :mod:`~diffusers_pafm.trainers`, :mod:`~diffusers_pafm.evaluation`, :mod:`~diffusers_pafm.utils`
"""

from .data import EncodedDataset, load_data_source, prepare_dataset
from .evaluation import InverseProblemResult, dps_pipeline_sampler, evaluate_inverse_problem, pipeline_sampler
from .flow_maps import (
    OPERATORS,
    DegradationOperator,
    FlowMapModel,
    MeanFlowLoss,
    Measurement,
    OneStepDistillation,
    RewardTerm,
    TwoTimeSampler,
    VFMLoss,
    build_operator,
    dps_sample,
    one_step,
    reward_guided_sample,
    sample_flow_map,
    stop_gradient,
)
from .models import (
    ContextNoiseAdapterModel,
    FlowMapTransformer2DModel,
    LinearFlowMapModel,
    MLPFlowMapModel,
    MLPNoiseAdapterModel,
    NoiseAdapterModel,
    OpenCLIPTextEncoder,
    PeftDiTTransformer2DModel,
    VelocityModel,
    add_lora,
    build_dit,
    build_sd3,
    load_clip,
    save_clip,
    save_lora,
    tiny_clip_config,
)
from .pafm import (
    PRESETS,
    BatchCandidates,
    ClassMatch,
    ClassMemoryBank,
    CLIPLikelihood,
    FlowBatch,
    KNNBank,
    KNNCandidates,
    KNNLookup,
    KNNNeighbourDataset,
    NoCondition,
    PAFMLoss,
    PosteriorEstimator,
    SelfCandidates,
    build_knn_bank,
    make_loss,
    make_posterior,
    nearest_neighbors,
    posterior_velocity,
    temperature_for_target_ess,
)
from .pipelines import FlowMatchingPipeline, RewardTiltedFlowMapPipeline, VariationalFlowMapPipeline
from .rewards import ClassifierReward, CLIPHeadReward, CLIPReward, load_reward
from .trainers import (
    DataConfig,
    MeanFlowTrainer,
    MeanFlowTrainingConfig,
    PAFMTrainer,
    PAFMTrainingConfig,
    RewardTrainer,
    RewardTrainingConfig,
    Trainer,
    TrainingConfig,
    TrainingResult,
    VFMTrainer,
    VFMTrainingConfig,
)
from .utils import push_export, render_model_card

__version__ = "0.1.0.dev0"

__all__ = [
    # pipelines
    "FlowMatchingPipeline",
    "VariationalFlowMapPipeline",
    "RewardTiltedFlowMapPipeline",
    # models
    "PeftDiTTransformer2DModel",
    "FlowMapTransformer2DModel",
    "MLPFlowMapModel",
    "LinearFlowMapModel",
    "NoiseAdapterModel",
    "MLPNoiseAdapterModel",
    "ContextNoiseAdapterModel",
    "OpenCLIPTextEncoder",
    "VelocityModel",
    "FlowMapModel",
    "build_dit",
    "build_sd3",
    "add_lora",
    "save_lora",
    "load_clip",
    "save_clip",
    "tiny_clip_config",
    # the PAFM objective family
    "PAFMLoss",
    "make_loss",
    "make_posterior",
    "PosteriorEstimator",
    "PRESETS",
    "FlowBatch",
    "posterior_velocity",
    "temperature_for_target_ess",
    "SelfCandidates",
    "BatchCandidates",
    "ClassMemoryBank",
    "KNNCandidates",
    "KNNBank",
    "KNNLookup",
    "KNNNeighbourDataset",
    "build_knn_bank",
    "nearest_neighbors",
    "NoCondition",
    "ClassMatch",
    "CLIPLikelihood",
    # flow maps and VFM
    "MeanFlowLoss",
    "TwoTimeSampler",
    "OneStepDistillation",
    "VFMLoss",
    "RewardTerm",
    "stop_gradient",
    "one_step",
    "sample_flow_map",
    "dps_sample",
    "reward_guided_sample",
    "OPERATORS",
    "build_operator",
    "DegradationOperator",
    "Measurement",
    # rewards (reward-tilted one-step generation)
    "ClassifierReward",
    "CLIPReward",
    "CLIPHeadReward",
    "load_reward",
    # training
    "Trainer",
    "TrainingConfig",
    "DataConfig",
    "TrainingResult",
    "PAFMTrainer",
    "PAFMTrainingConfig",
    "MeanFlowTrainer",
    "MeanFlowTrainingConfig",
    "VFMTrainer",
    "VFMTrainingConfig",
    "RewardTrainer",
    "RewardTrainingConfig",
    "EncodedDataset",
    "load_data_source",
    "prepare_dataset",
    # evaluation
    "evaluate_inverse_problem",
    "InverseProblemResult",
    "pipeline_sampler",
    "dps_pipeline_sampler",
    # sharing
    "push_export",
    "render_model_card",
]
