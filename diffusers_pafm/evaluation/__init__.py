"""Evaluation: sample metrics (NLPD, CRPS, MMD, PSNR, SSIM, FD), feature networks, and the inverse-problem protocol."""

from .feature_networks import FeatureClassifier, InceptionFeatures, train_feature_classifier
from .gaussian_reference import (
    DiagonalAdapterPosterior,
    GaussianImagePrior,
    calibration_to_reference,
    diagonal_adapter_gap,
    fit_shared_rotation,
    operator_matrix,
)
from .inverse_problems import (
    InverseProblemResult,
    dps_pipeline_sampler,
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
    prior_drift,
    psnr,
    sample_checkerboard,
    ssim,
    summarize_runs,
)
from .reporting import environment, write_results

__all__ = [
    "summarize_runs",
    "nlpd",
    "crps",
    "interval_coverage",
    "GaussianImagePrior",
    "DiagonalAdapterPosterior",
    "diagonal_adapter_gap",
    "fit_shared_rotation",
    "operator_matrix",
    "calibration_to_reference",
    "mmd",
    "prior_drift",
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
    "write_results",
    "heldout_patches",
    "InverseProblemResult",
    "evaluate_inverse_problem",
    "pipeline_sampler",
    "dps_pipeline_sampler",
    "unconditional_samples",
]
