"""Named configurations of :class:`~.losses.PAFMLoss`: the PAFM family as presets of one weighted-target loss.

==========  =======================================  ====================  ==========================================
preset      candidates                               condition term        reference
==========  =======================================  ====================  ==========================================
fm          own endpoint only (no posterior)         -                     plain flow matching (Lipman et al.)
stf         global batch                             none                  Stable Target Field (Xu et al., ICLR'23)
efm         global batch + ring buffer of extras     none                  Empirical FM (Bertrand et al., NeurIPS'25)
stablevm    per-class memory bank (null: global)     class match           StableVM (Yang et al., ICML'26)
pafm        global batch or kNN bank                 class match or CLIP   PAFM (Stoica et al., 2026)
==========  =======================================  ====================  ==========================================

All presets use temperature 1 (the exact posterior over the candidates) unless ``temperature`` or ``target_ess``
is overridden. The sum form's value is then unbiased for the FM loss with the batch, EFM and class-bank sources
(candidates exchangeable with the own endpoint); with kNN candidates or the CLIP term it is not (``docs/pafm.md``).
:func:`make_posterior` builds the same candidates and likelihood for other objectives (posterior MeanFlow).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .candidates import BatchCandidates, CandidateSource, ClassMemoryBank, KNNCandidates
from .knn import KNNBank
from .likelihoods import ClassMatch, CLIPLikelihood, NoCondition
from .loss import PAFMLoss

__all__ = ["PRESETS", "make_loss", "make_posterior"]

PRESETS = ("fm", "stf", "efm", "stablevm", "pafm")
CANDIDATE_SOURCES = ("batch", "class_bank", "knn")
CONDITION_LIKELIHOODS = ("class", "clip", "none")


def make_posterior(
    preset: str = "pafm",
    *,
    candidates: str | None = None,
    condition_likelihood: str | None = None,
    num_classes: int | None = None,
    sample_shape: tuple[int, ...] | None = None,
    knn_bank: str | KNNBank | None = None,
    knn_k: int | None = None,
    bank_size: int = 256,
    efm_extra_samples: int = 256,
    clip_temperature: float = 0.01,
    null_class_id: int | None = None,
) -> tuple[CandidateSource | None, nn.Module | None]:
    """The (candidate source, condition likelihood) of a preset (``(None, None)`` for "fm"); ``candidates`` /
    ``condition_likelihood`` override the preset's choice. ``null_class_id`` defaults to ``num_classes``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown objective preset {preset!r}; choose one of {PRESETS}")
    null_class_id = num_classes if null_class_id is None else null_class_id
    if preset == "fm":
        return None, None
    source = candidates or {"stf": "batch", "efm": "efm_batch", "stablevm": "class_bank", "pafm": "batch"}[preset]
    condition = condition_likelihood or {"stf": "none", "efm": "none"}.get(preset, "class")
    if source not in CANDIDATE_SOURCES + ("efm_batch",):
        raise ValueError(f"unknown candidate source {source!r}; choose one of {CANDIDATE_SOURCES}")
    if condition not in CONDITION_LIKELIHOODS:
        raise ValueError(f"unknown condition likelihood {condition!r}; choose one of {CONDITION_LIKELIHOODS}")

    if source == "batch":
        cand = BatchCandidates()
    elif source == "efm_batch":
        if sample_shape is None:
            raise ValueError("the efm preset needs sample_shape for its ring buffer of extra samples")
        cand = BatchCandidates(memory=efm_extra_samples, sample_shape=sample_shape)
    elif source == "class_bank":
        if num_classes is None or sample_shape is None:
            raise ValueError("class_bank candidates need num_classes and sample_shape")
        cand = ClassMemoryBank(num_classes, sample_shape, bank_size=bank_size)
    else:
        if knn_bank is None:
            raise ValueError(
                "--candidates knn needs a kNN bank folder; build it first with `python training/build_knn_index.py`"
            )
        cand = KNNCandidates(knn_bank if isinstance(knn_bank, KNNBank) else KNNBank(knn_bank), k=knn_k)

    if condition == "class":
        likelihood = ClassMatch(null_class_id=null_class_id)
    elif condition == "clip":
        likelihood = CLIPLikelihood(temperature=clip_temperature)
    else:
        likelihood = NoCondition()
    return cand, likelihood


def make_loss(preset: str = "pafm", **kwargs: Any) -> PAFMLoss:
    """The :class:`PAFMLoss` of a preset. The keyword arguments of :func:`make_posterior` pick the candidates and
    likelihood (``num_classes`` is the number of real classes, the null class id is ``num_classes``;
    ``sample_shape`` the shape of one latent, needed by memory banks; ``knn_bank`` a folder written by
    ``training/build_knn_index.py``); the rest go to :class:`PAFMLoss` (``temperature``, ``target_ess``,
    ``fm_mix``, ...)."""
    names = inspect.signature(make_posterior).parameters
    posterior_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    kwargs.setdefault("null_class_id", posterior_kwargs.get("num_classes"))
    posterior_kwargs["null_class_id"] = kwargs["null_class_id"]
    cand, likelihood = make_posterior(preset, **posterior_kwargs)
    return PAFMLoss(candidates=cand, likelihood=likelihood, **kwargs)
