"""MeanFlowTrainer: train a two-time flow map u(x_t, t, r) with the MeanFlow objective on the shared engine.

``--objective fm`` (default) is plain MeanFlow; any other PAFM preset (``stf``, ``efm``, ``stablevm``, ``pafm``, with
``--candidates``, ``--condition_likelihood``, ``--temperature``, ``--loss_form`` as in ``train_pafm.py``) puts the
posterior velocity into the MeanFlow target (posterior MeanFlow, :class:`~diffusers_pafm.flow_maps.MeanFlowLoss`).

Start from a PAFMTrainer FM pipeline or DiT folder (``pretrained_model_name_or_path``: the flow map then starts
equal to that FM model) or from scratch. Export: the flow map alone in ``<output_dir>/transformer/``, the starting
point of :class:`~.vfm.VFMTrainer`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..data import DataConfig, EncodedDataset
from ..flow_maps import DERIVATIVE_MODES, FlowMapModel, MeanFlowLoss, TwoTimeSampler, sample_flow_map
from ..models import FlowMapTransformer2DModel, build_dit
from ..pafm.batch import FlowBatch
from ..pafm.config import PosteriorConfig
from ..pafm.knn import KNNLookup
from ..pafm.presets import make_posterior
from ..pafm.target import PosteriorEstimator
from ..utils.images import to_pil
from ..utils.options import check, option
from ..utils.vae import decode_latents
from .engine import Trainer, TrainingConfig

__all__ = [
    "FlowMapConfig",
    "FlowMapTrainingConfig",
    "MeanFlowTrainingConfig",
    "MeanFlowTrainer",
    "FlowMapTrainerBase",
    "build_flow_map",
    "build_meanflow_loss",
    "meanflow_loader_dataset",
    "flow_batch",
    "posterior_state",
    "time_sampler",
]

NEW_MAP_OPTIONS = ("prediction_type", "time_embedding_scale")
"""options that shape a flow map trained from scratch (a pretrained map keeps its own)"""


@dataclass
class FlowMapConfig(PosteriorConfig):
    """The flow map and its MeanFlow term (shared by :class:`MeanFlowTrainer` and :class:`~.vfm.VFMTrainer`)."""

    objective: str = option(
        "fm (plain MeanFlow) | stf | efm | stablevm | pafm (the preset's posterior velocity in the MeanFlow target)",
        default="fm",
    )
    loss_form: str = option(
        "mean (no extra cost) | sum (value = weighted sum of per-candidate MeanFlow losses; one more directional "
        "derivative on r != t rows)",
        default="mean",
    )

    pretrained_model_name_or_path: str | None = option(
        "flow map / FM DiT / pipeline folder to start from (a VFM pipeline folder also provides the adapter)",
        default=None,
    )
    model_size: str = option("DiT size of a flow map trained from scratch", default="tiny")
    patch_size: int = option("DiT patch size of a new flow map", default=4)
    prediction_type: str = option(
        'new flow map: "sample" (outputs x_hat: the one-step map is the network\'s endpoint estimate) or "velocity" '
        "(outputs u)",
        default="sample",
    )
    time_embedding_scale: float = option(
        "new flow map: the time embedders see this x t (1 as MeanFlow/VFM: keeps the JVP small; 1000 as diffusers' "
        "DiT)",
        default=1.0,
    )
    meanflow_time_sampling: str = option(
        'density of t, r: "uniform" (t = 1 is seen often enough for one-step samples), "logit_normal" or "mode"',
        default="uniform",
    )
    meanflow_logit_mean: float = option("logit-normal mean of t, r", default=-0.4)
    meanflow_logit_std: float = option("logit-normal std of t, r", default=1.0)
    meanflow_r_neq_t: float = option("fraction of (t, r) pairs with r != t", default=0.5)
    meanflow_adaptive_power: float = option("p of the per-row weight 1 / sg(L_row + 1e-3)^p (0 = off)", default=1.0)
    meanflow_derivative: str = option(
        'du/dt by "jvp" (forward AD), "compiled_jvp" (the same through torch.compile: on CPU a MeanFlow step costs '
        "1.21x an FM step instead of 1.48x, after a one-off compile of 20-40 s per process and batch shape), "
        '"double_backward" (exact, as the gradient of a vector-Jacobian product: 1.38x, no compile) or '
        '"finite_difference"',
        default="jvp",
    )
    validation_inference_steps: int = option("flow-map steps of validation samples", default=1)

    def validate(self) -> None:
        super().validate()
        types = ("velocity", "sample")
        check(self.prediction_type in types, "prediction_type", self.prediction_type, 'one of "velocity", "sample"')
        check(self.time_embedding_scale > 0, "time_embedding_scale", self.time_embedding_scale, "a positive number")
        schemes = ("logit_normal", "mode", "uniform")
        check(
            self.meanflow_time_sampling in schemes,
            "meanflow_time_sampling",
            self.meanflow_time_sampling,
            "one of logit_normal, mode, uniform",
        )
        check(0 <= self.meanflow_r_neq_t <= 1, "meanflow_r_neq_t", self.meanflow_r_neq_t, "a fraction in [0, 1]")
        check(
            self.meanflow_derivative in DERIVATIVE_MODES,
            "meanflow_derivative",
            self.meanflow_derivative,
            "one of " + ", ".join(DERIVATIVE_MODES),
        )
        check(
            self.validation_inference_steps >= 1,
            "validation_inference_steps",
            self.validation_inference_steps,
            "a positive integer",
        )


@dataclass
class FlowMapTrainingConfig(TrainingConfig):
    """The optimiser recipe of both ``train_vfm.py`` stages (docs/vfm_recipe.md): what the demo measured."""

    train_batch_size: int = option("batch size per process (global batch = this x processes)", default=32)
    learning_rate: float = option("peak learning rate", default=1e-3)
    lr_scheduler: str = option('diffusers get_scheduler name: "constant", "cosine", "linear", ...', default="cosine")
    lr_warmup_steps: int = option("linear warm-up steps (the joint stage starts unstable without)", default=100)
    use_ema: bool = option("keep an EMA of the trainable weights (exported instead of the raw ones)", default=True)
    ema_decay: float = option("EMA decay (with diffusers' warm-up)", default=0.999)


@dataclass
class MeanFlowTrainingConfig(FlowMapTrainingConfig, DataConfig, FlowMapConfig):
    """Everything ``training/train_vfm.py --stage meanflow`` accepts."""

    output_dir: str = option("where checkpoints, logs and the final flow map go", default="flowmap-output")
    dataset: str = option("patches | digits | an image folder | shards | a precompute.py folder", default="patches")
    class_dropout: float = option("label dropout (class-conditional data)", default=0.1)

    def validate(self) -> None:
        super().validate()
        check(0 <= self.class_dropout < 1, "class_dropout", self.class_dropout, "a probability in [0, 1)")


def time_sampler(cfg: FlowMapConfig) -> TwoTimeSampler:
    """The (t, r) sampler the config describes."""
    return TwoTimeSampler(
        scheme=cfg.meanflow_time_sampling,
        logit_mean=cfg.meanflow_logit_mean,
        logit_std=cfg.meanflow_logit_std,
        r_neq_t=cfg.meanflow_r_neq_t,
    )


def build_meanflow_loss(cfg: FlowMapConfig, dataset: EncodedDataset, num_classes: int) -> MeanFlowLoss:
    """The MeanFlow term of ``cfg``: plain, or with the posterior of ``cfg.objective`` (``num_classes`` real classes
    of the flow map; its null id is ``num_classes``)."""
    posterior = None
    if cfg.objective != "fm":
        if cfg.condition_likelihood == "caption":
            raise ValueError(
                "--condition_likelihood caption is for train_pafm.py --model sd3; use class, clip or none"
            )
        condition = cfg.condition_likelihood
        if condition is None:
            labelled = dataset.arrays.get("class_labels") is not None
            condition = "class" if cfg.objective in ("pafm", "stablevm") and labelled else "none"
        candidates, likelihood = make_posterior(
            cfg.objective, **cfg.posterior_kwargs(dataset, cfg.dataset, num_classes, condition)
        )
        posterior = PosteriorEstimator(candidates, likelihood, cfg.temperature, cfg.target_ess)
    return MeanFlowLoss(
        time_sampler(cfg),
        adaptive_power=cfg.meanflow_adaptive_power,
        mode=cfg.meanflow_derivative,
        posterior=posterior,
        form=cfg.loss_form,
    )


def posterior_state(meanflow: MeanFlowLoss) -> dict[str, Any]:
    """The checkpointed state of a MeanFlow term: its posterior's memory banks, if any."""
    return {} if meanflow.posterior is None else {"posterior": meanflow.posterior}


def flow_batch(batch: dict[str, torch.Tensor], labels: torch.Tensor | None) -> FlowBatch:
    """What the posterior's candidates and likelihood need from a data-loader batch."""
    return FlowBatch(
        x=batch["x"],
        class_labels=labels,
        text_embeds=batch.get("clip_text"),
        image_embeds=batch.get("clip_image"),
        sample_ids=batch.get("sample_ids"),
        neighbours=KNNLookup.from_batch(batch),
    )


def meanflow_loader_dataset(meanflow: MeanFlowLoss, dataset: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
    """The loader's dataset for a MeanFlow term: wrapped by the posterior's candidate source (kNN neighbours)."""
    return dataset if meanflow.posterior is None else meanflow.posterior.candidates.loader_dataset(dataset)


def build_flow_map(cfg: FlowMapConfig, dataset: EncodedDataset) -> FlowMapTransformer2DModel:
    """The pretrained flow map (or FM DiT turned into one) of ``cfg``, or a new one shaped for ``dataset``."""
    if cfg.pretrained_model_name_or_path:
        folder = Path(cfg.pretrained_model_name_or_path)
        sub = "transformer" if (folder / "transformer" / "config.json").is_file() else None
        flow_map = FlowMapTransformer2DModel.from_pretrained(folder, subfolder=sub, use_safetensors=True)
        defaults = {f.name: f.default for f in fields(cfg)}
        for option in NEW_MAP_OPTIONS:  # a pretrained map keeps its own; a different explicit value is an error
            requested, own = getattr(cfg, option), flow_map.config[option]
            if requested != defaults[option] and requested != own:
                raise ValueError(
                    f"--{option} {requested} applies to a new flow map; {folder} has {option}={own!r} (leave "
                    f"--{option} at its default to keep it)"
                )
    else:
        num_classes = dataset.num_classes or 1
        dit = build_dit(cfg.model_size, dataset.sample_shape[0], dataset.sample_shape[-1], num_classes, cfg.patch_size)
        flow_map = FlowMapTransformer2DModel.from_flow_matching(
            dit, prediction_type=cfg.prediction_type, time_embedding_scale=cfg.time_embedding_scale
        )
    config = flow_map.config
    dataset.check(
        sample_shape=(config.in_channels, config.sample_size, config.sample_size),
        num_classes=config.num_embeds_ada_norm,
    )
    return flow_map


class FlowMapTrainerBase(Trainer):
    """What the flow-map trainers share: the encoded data and its VAE, the MeanFlow term's memory banks in the
    checkpoints and its loader wrapping (kNN neighbours), decoding latents. ``build_models`` sets ``self.meanflow``
    (the MeanFlow term, alone or inside a VFM objective)."""

    meanflow: MeanFlowLoss

    def __init__(self, config: TrainingConfig):
        super().__init__(config)
        self.vae = None

    def build_dataset(self) -> EncodedDataset:
        dataset, encoders = self.prepare_data()
        self.vae, self.dataset, self.encoders = encoders.vae, dataset, encoders
        return dataset

    def extra_state(self) -> dict[str, Any]:
        return posterior_state(self.meanflow)

    def loader_dataset(self, dataset: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        return meanflow_loader_dataset(self.meanflow, dataset)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents)

    @torch.no_grad()
    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in image space: decoded through the VAE when the flow map works on latents (no gradient)."""
        return x if self.vae is None else self._decode(x)


class MeanFlowTrainer(FlowMapTrainerBase):
    """MeanFlow training of a flow map (module docstring).

    Examples:
        ```py
        >>> from diffusers_pafm import MeanFlowTrainer, MeanFlowTrainingConfig

        >>> config = MeanFlowTrainingConfig(dataset="patches", resolution=16, max_train_steps=2000)
        >>> MeanFlowTrainer(config).train()  # doctest: +SKIP
        ```
    """

    config_class = MeanFlowTrainingConfig
    log_keys = ("loss", "mse", "ess")

    def build_models(self) -> dict[str, torch.nn.Module]:
        cfg = self.config
        flow_map = build_flow_map(cfg, self.dataset)
        self.meanflow = build_meanflow_loss(cfg, self.dataset, flow_map.config.num_embeds_ada_norm)
        return {"transformer": flow_map}

    def compute_loss(self, models, batch):
        cfg, x = self.config, batch["x"]
        flow_map = models["transformer"]
        unwrapped = self.accelerator.unwrap_model(flow_map)
        null = unwrapped.config.num_embeds_ada_norm
        labels = batch.get("class_labels", torch.full((x.shape[0],), null, device=x.device))
        g = self.global_batch_size
        drop = self.local_slice(torch.rand(g, generator=self.generator) < cfg.class_dropout)
        labels = torch.where(drop, torch.full_like(labels, null), labels)
        t, r = (self.local_slice(v) for v in self.meanflow.time_sampler(g, self.generator))
        noise = self.local_slice(torch.randn((g, *x.shape[1:]), generator=self.generator)).to(x.dtype)
        out = self.meanflow(
            FlowMapModel(flow_map),
            x,
            noise=noise,
            t=t,
            r=r,
            class_labels=labels,
            jvp_model=FlowMapModel(unwrapped),
            batch=flow_batch(batch, labels),
            generator=self.process_generator,
        )
        scalars = {"loss": float(out.loss.detach()), "mse": float(out.mse)}
        if self.meanflow.posterior is not None:
            scalars.update(ess=float(out.ess.mean()), self_weight=float(out.self_weight.mean()))
            scalars["spread"] = float(out.spread.mean())
        return out.loss, scalars

    @torch.no_grad()
    def validation_images(self, models) -> tuple[list[Image.Image], int]:
        """Eight unconditional samples (null label) from fixed noise."""
        gen = torch.Generator().manual_seed(self.config.seed)
        fm = models["transformer"]
        noise = torch.randn((8, *self.dataset.sample_shape), generator=gen).to(fm.device)
        labels = torch.full((8,), fm.config.num_embeds_ada_norm, device=fm.device)
        x = sample_flow_map(FlowMapModel(fm), noise, self.config.validation_inference_steps, labels)
        return [to_pil(image) for image in self.pixels(x)], 8

    def export(self, models, directory: Path) -> None:
        models["transformer"].save_pretrained(directory / "transformer")
