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

All presets use temperature 1 (the exact posterior over the candidates, unbiased for the FM loss) unless
``temperature`` or ``target_ess`` is overridden.
"""

from __future__ import annotations

from typing import Any

from .candidates import BatchCandidates, ClassMemoryBank, KNNCandidates
from .knn import KNNBank
from .likelihoods import ClassMatch, CLIPLikelihood, NoCondition
from .loss import PAFMLoss

__all__ = ["PRESETS", "make_loss"]

PRESETS = ("fm", "stf", "efm", "stablevm", "pafm")
CANDIDATE_SOURCES = ("batch", "class_bank", "knn")
CONDITION_LIKELIHOODS = ("class", "clip", "none")


def make_loss(
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
    **loss_kwargs: Any,
) -> PAFMLoss:
    """Build the loss of a preset; ``candidates`` / ``condition_likelihood`` override the preset's choice.

    ``num_classes`` is the number of real classes (the null class id is ``num_classes``); ``sample_shape`` is the
    shape of one latent (needed by memory banks); ``knn_bank`` a folder written by ``training/build_knn_index.py``.
    Remaining keyword arguments go to :class:`PAFMLoss` (``temperature``, ``target_ess``, ``fm_mix``, ...).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown objective preset {preset!r}; choose one of {PRESETS}")
    loss_kwargs.setdefault("null_class_id", num_classes)
    if preset == "fm":
        return PAFMLoss(candidates=None, likelihood=None, **loss_kwargs)
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
        likelihood = ClassMatch(null_class_id=loss_kwargs["null_class_id"])
    elif condition == "clip":
        likelihood = CLIPLikelihood(temperature=clip_temperature)
    else:
        likelihood = NoCondition()
    return PAFMLoss(candidates=cand, likelihood=likelihood, **loss_kwargs)
