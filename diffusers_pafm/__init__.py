"""diffusers-pafm: Posterior-Augmented Flow Matching (and, later, Variational Flow Maps) for Hugging Face diffusers.

Time convention everywhere: diffusers' sigma, x_t = (1 - t) x + t eps, t = 1 is noise, v = eps - x.
"""

from .candidates import BatchCandidates, CandidateSet, ClassMemoryBank, FlowBatch, KNNCandidates, SelfCandidates
from .clip import CLIPBundle, fit_clip, load_clip, save_clip, tiny_clip_config
from .conditions import ClassMatch, CLIPLikelihood, NoCondition
from .data import EncodedDataset, encode_data_source, load_data_source, prepare_dataset
from .evaluation import InverseProblemResult, dps_pipeline_sampler, evaluate_inverse_problem, pipeline_sampler
from .feature_networks import FeatureClassifier, InceptionFeatures, train_feature_classifier
from .flow_map import (
    FlowMapModel,
    MeanFlowLoss,
    MeanFlowLossOutput,
    OneStepDistillation,
    TwoTimeSampler,
    meanflow_target,
    one_step_distillation_loss,
    sample_flow_map,
)
from .guidance import dps_sample
from .hub import push_export, render_model_card
from .knn import KNNBank, build_knn_bank, nearest_neighbors
from .lora import add_lora, save_lora
from .losses import PAFMLoss, PAFMLossOutput
from .models import (
    FlowMapTransformer2DModel,
    MLPNoiseAdapterModel,
    NoiseAdapterModel,
    OpenCLIPTextEncoder,
    PeftDiTTransformer2DModel,
    build_dit,
    build_sd3,
    encode_prompt,
)
from .operators import OPERATORS, Measurement, build_operator
from .paths import (
    PathSample,
    conditional_velocity,
    from_data_at_one,
    gaussian_path_log_likelihood,
    interpolate,
    noise_to_velocity,
    sample_path,
    sample_to_velocity,
    velocity_to_noise,
    velocity_to_sample,
)
from .pipelines import FlowMatchingPipeline, VariationalFlowMapPipeline
from .posterior import PosteriorVelocity, path_log_likelihoods, posterior_velocity, temperature_for_target_ess
from .presets import PRESETS, make_loss
from .time_sampling import TimeSampler
from .trainers import (
    PAFMTrainer,
    PAFMTrainingConfig,
    Trainer,
    TrainingConfig,
    TrainingResult,
    VFMTrainer,
    VFMTrainingConfig,
)
from .velocity_model import VelocityModel, disable_label_dropout
from .vfm import VFMLoss, VFMLossOutput, stop_gradient

__version__ = "0.1.0.dev0"

__all__ = [
    # probability path (diffusers sigma convention)
    "PathSample",
    "sample_path",
    "interpolate",
    "conditional_velocity",
    "gaussian_path_log_likelihood",
    "velocity_to_sample",
    "velocity_to_noise",
    "sample_to_velocity",
    "noise_to_velocity",
    "from_data_at_one",
    "TimeSampler",
    # posterior weights and velocity
    "posterior_velocity",
    "PosteriorVelocity",
    "path_log_likelihoods",
    "temperature_for_target_ess",
    # objective
    "PAFMLoss",
    "PAFMLossOutput",
    "make_loss",
    "PRESETS",
    "FlowBatch",
    "CandidateSet",
    "SelfCandidates",
    "BatchCandidates",
    "ClassMemoryBank",
    "KNNCandidates",
    "NoCondition",
    "ClassMatch",
    "CLIPLikelihood",
    # kNN bank and CLIP
    "KNNBank",
    "build_knn_bank",
    "nearest_neighbors",
    "CLIPBundle",
    "load_clip",
    "save_clip",
    "tiny_clip_config",
    "fit_clip",
    # models and pipelines
    "VelocityModel",
    "disable_label_dropout",
    "FlowMatchingPipeline",
    "PeftDiTTransformer2DModel",
    "OpenCLIPTextEncoder",
    "build_dit",
    "build_sd3",
    "encode_prompt",
    # training
    "PAFMTrainer",
    "PAFMTrainingConfig",
    "Trainer",
    "TrainingConfig",
    "TrainingResult",
    "EncodedDataset",
    "load_data_source",
    "encode_data_source",
    "prepare_dataset",
    "add_lora",
    "save_lora",
    # flow maps and VFM
    "FlowMapTransformer2DModel",
    "FlowMapModel",
    "MeanFlowLoss",
    "MeanFlowLossOutput",
    "OneStepDistillation",
    "one_step_distillation_loss",
    "TwoTimeSampler",
    "meanflow_target",
    "sample_flow_map",
    "NoiseAdapterModel",
    "MLPNoiseAdapterModel",
    "OPERATORS",
    "build_operator",
    "Measurement",
    "VFMLoss",
    "VFMLossOutput",
    "stop_gradient",
    "VariationalFlowMapPipeline",
    "VFMTrainer",
    "VFMTrainingConfig",
    # evaluation and the guided baseline
    "evaluate_inverse_problem",
    "InverseProblemResult",
    "pipeline_sampler",
    "dps_pipeline_sampler",
    "dps_sample",
    "FeatureClassifier",
    "train_feature_classifier",
    "InceptionFeatures",
    # sharing
    "push_export",
    "render_model_card",
]
