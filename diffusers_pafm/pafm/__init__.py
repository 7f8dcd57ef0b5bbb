"""The PAFM objective family: the batch type, posterior weights, candidate sources, condition likelihoods, the loss,
the posterior target shared with MeanFlow, its presets (FM, STF, EFM, StableVM, PAFM) and the offline kNN bank."""

from .batch import CandidateSet, FlowBatch
from .candidates import BatchCandidates, CandidateSource, ClassMemoryBank, KNNCandidates, SelfCandidates
from .knn import KNNBank, KNNLookup, KNNNeighbourDataset, build_knn_bank, faiss_available, nearest_neighbors
from .likelihoods import ClassMatch, CLIPLikelihood, NoCondition
from .loss import PAFMLoss, PAFMLossOutput
from .posterior import PosteriorVelocity, path_log_likelihoods, posterior_velocity, temperature_for_target_ess
from .presets import PRESETS, make_loss, make_posterior
from .target import PosteriorEstimator, PosteriorTarget

__all__ = [
    "FlowBatch",
    "CandidateSet",
    "PosteriorVelocity",
    "posterior_velocity",
    "path_log_likelihoods",
    "temperature_for_target_ess",
    "CandidateSource",
    "SelfCandidates",
    "BatchCandidates",
    "ClassMemoryBank",
    "KNNCandidates",
    "NoCondition",
    "ClassMatch",
    "CLIPLikelihood",
    "PAFMLoss",
    "PAFMLossOutput",
    "PosteriorTarget",
    "PosteriorEstimator",
    "make_posterior",
    "PRESETS",
    "make_loss",
    "nearest_neighbors",
    "build_knn_bank",
    "KNNBank",
    "KNNLookup",
    "KNNNeighbourDataset",
    "faiss_available",
]
