"""Evaluation: sample metrics (NLPD, CRPS, MMD, PSNR, SSIM, FD), feature networks, and the inverse-problem protocol."""

from .feature_networks import FeatureClassifier, InceptionFeatures, train_feature_classifier
from .gaussian_reference import GaussianImagePrior, calibration_to_reference, operator_matrix
from .inverse_problems import (
    InverseProblemResult,
    dps_pipeline_sampler,
    environment,
    evaluate_inverse_problem,
    heldout_patches,
    pipeline_sampler,
    unconditional_samples,
)
from .metrics import (
    checkerboard_support,
    crps,
    frechet_distance,
    interval_coverage,
    mmd,
    nearest_neighbor_distance,
    nlpd,
    psnr,
    sample_checkerboard,
    ssim,
    summarize_runs,
)

__all__ = [
    "summarize_runs",
    "nlpd",
    "crps",
    "interval_coverage",
    "GaussianImagePrior",
    "operator_matrix",
    "calibration_to_reference",
    "mmd",
    "psnr",
    "ssim",
    "frechet_distance",
    "nearest_neighbor_distance",
    "checkerboard_support",
    "sample_checkerboard",
    "FeatureClassifier",
    "train_feature_classifier",
    "InceptionFeatures",
    "environment",
    "heldout_patches",
    "InverseProblemResult",
    "evaluate_inverse_problem",
    "pipeline_sampler",
    "dps_pipeline_sampler",
    "unconditional_samples",
]
