"""The posterior part of a training config, defined once: which preset, candidates, likelihood and temperature.

Mixed into :class:`~diffusers_pafm.trainers.PAFMTrainingConfig` (``train_pafm.py``, default ``--objective pafm``)
and the flow-map config of ``train_vfm.py`` (default ``--objective fm``: plain MeanFlow; any other preset puts the
posterior velocity into the MeanFlow target). :meth:`PosteriorConfig.posterior_kwargs` checks the options against
the encoded data and returns the keyword arguments of :func:`~.presets.make_posterior`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.options import ConfigPart, check, option
from .knn import KNNBank
from .presets import PRESETS

__all__ = ["PosteriorConfig"]


@dataclass
class PosteriorConfig(ConfigPart):
    """Objective preset and the posterior target's candidates, likelihood and temperature (``docs/pafm.md``)."""

    objective: str = option("fm | stf | efm | stablevm | pafm", default="pafm")
    candidates: str | None = option("batch | class_bank | knn (default: the objective's)", default=None)
    condition_likelihood: str | None = option(
        "class | clip | caption (identical captions = one class, the paper's naive text variant) | none "
        "(default: class, or clip with captions)",
        default=None,
    )
    knn_index: str | None = option("kNN bank folder (default: <dataset>/knn for precomputed data)", default=None)
    knn_k: int | None = option("neighbours per sample (default: all in the bank)", default=None)
    temperature: float = option(
        "posterior temperature (1 = the exact posterior over the candidates; the sum form is then unbiased for "
        "exchangeable candidates: batch, efm, class bank)",
        default=1.0,
    )
    target_ess: float | None = option("per-row temperature reaching this ESS (overrides --temperature)", default=None)
    loss_form: str = option("sum (value estimates the plain loss) | mean (same gradient)", default="sum")
    bank_size: int = option("class-bank / EFM memory size", default=256)

    def validate(self) -> None:
        super().validate()
        check(self.objective in PRESETS, "objective", self.objective, f"one of {sorted(PRESETS)}")
        cands = (None, "batch", "class_bank", "knn")
        check(self.candidates in cands, "candidates", self.candidates, "one of batch, class_bank, knn")
        likelihoods = (None, "class", "clip", "caption", "none")
        check(
            self.condition_likelihood in likelihoods,
            "condition_likelihood",
            self.condition_likelihood,
            "one of class, clip, caption, none",
        )
        check(self.temperature > 0, "temperature", self.temperature, "a positive number")
        check(self.target_ess is None or self.target_ess >= 1, "target_ess", self.target_ess, ">= 1 or unset")
        check(self.loss_form in ("sum", "mean"), "loss_form", self.loss_form, 'one of "sum", "mean"')
        check(self.bank_size >= 1, "bank_size", self.bank_size, "a positive integer")
        check(self.knn_k is None or self.knn_k >= 1, "knn_k", self.knn_k, "a positive integer or unset")

    def posterior_kwargs(
        self, data, dataset_path: str, num_classes: int | None, condition: str | None
    ) -> dict[str, Any]:
        """:func:`~.presets.make_posterior` keyword arguments for encoded ``data``; ``condition`` is the resolved
        likelihood ("class", "clip", "none"). A missing or mismatched kNN index and CLIP without embeddings are
        errors naming the flag."""
        if condition == "clip" and data.arrays.get("clip_image") is None:
            raise ValueError(
                "--condition_likelihood clip needs CLIP embeddings: give --clip_model (data with captions)"
            )
        knn_bank = None
        if self.candidates == "knn":
            path = self.knn_index
            if path is None and (Path(dataset_path) / "knn").is_dir():
                path = str(Path(dataset_path) / "knn")
            if path is None:
                raise ValueError(
                    "--candidates knn needs a kNN index: pass --knn_index, or precompute the dataset with "
                    "`python training/precompute.py --build_knn_index` and train on that folder"
                )
            knn_bank = KNNBank(path)
            shape = tuple(knn_bank.latents.shape[1:])
            if len(knn_bank) != len(data) or shape != data.sample_shape:
                raise ValueError(
                    f"the kNN index at {path} holds {len(knn_bank)} samples of shape {shape} but the dataset has "
                    f"{len(data)} of shape {data.sample_shape}; build the index from the same encoded dataset "
                    "(training/precompute.py --build_knn_index)"
                )
        return {
            "candidates": self.candidates,
            "condition_likelihood": condition,
            "num_classes": num_classes,
            "sample_shape": data.sample_shape,
            "knn_bank": knn_bank,
            "knn_k": self.knn_k,
            "bank_size": self.bank_size,
        }
