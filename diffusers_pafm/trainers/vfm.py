"""VFMTrainer: joint training of a noise adapter q(z | y) and a flow map with the VFM objective.

Start from a flow map (:class:`~.meanflow.MeanFlowTrainer`'s export, a FM DiT, or a VFM pipeline folder that also
holds an adapter) with ``pretrained_model_name_or_path``. Each sample draws a degradation from ``tasks`` and fresh
operator randomness. ``adapter_only=True`` is the paper's baseline: the flow map is frozen and only the adapter
learns.

Data flows: images -> (VAE latents) -> x; pixels -> task operator -> y = A x + sigma eta -> A^+ y -> adapter -> z
-> flow map. Export: a :class:`~diffusers_pafm.VariationalFlowMapPipeline`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMapEulerDiscreteScheduler
from PIL import Image

from ..data import DataConfig
from ..evaluation.inverse_problems import unconditional_samples
from ..evaluation.metrics import prior_drift
from ..flow_maps import OPERATORS, FlowMapModel, Measurement, VFMLoss, stop_gradient
from ..models import FlowMapTransformer2DModel, NoiseAdapterModel
from ..pipelines import VariationalFlowMapPipeline
from ..utils.hub import render_model_card
from ..utils.images import to_pil
from ..utils.options import ConfigPart, check, option
from .meanflow import (
    FlowMapConfig,
    FlowMapTrainerBase,
    FlowMapTrainingConfig,
    build_flow_map,
    build_meanflow_loss,
    flow_batch,
)

__all__ = ["VFMConfig", "VFMTrainingConfig", "VFMTrainer"]

PRIOR_PROBE_SAMPLES = 256
"""unconditional one-step samples (fixed noise) that measure the joint stage's prior drift"""
PRIOR_KEPT = (0.8, 1.25)
"""spread ratios (trained map over starting map) reported as a kept prior"""


@dataclass
class VFMConfig(ConfigPart):
    """The VFM objective and the noise adapter."""

    tasks: str = option(
        "comma-separated degradations: denoise, random_inpaint, box_inpaint, super_resolution_2x, "
        "super_resolution_4x, gaussian_blur, motion_blur",
        default="box_inpaint,super_resolution_2x",
    )
    measurement_sigma: float = option("observation noise sigma (images in [-1, 1])", default=0.05)
    tau: float = option("data-misfit tolerance of the flow-map term (tau > sigma)", default=1.0)
    alpha: float = option("probability that the flow-map term uses adapter noise", default=0.8)
    adaptive_eps: float = option("c in L / sg(L + c)", default=0.01)
    observation_trains_flow_map: bool | None = option(
        "the observation term's gradient reaches the flow map (default: on for joint training, off with "
        "--adapter_only). On: better posterior samples, and a map whose own unconditional samples contract; false "
        "(a stop-gradient copy, as in the paper) keeps the map's prior at a cost in posterior quality "
        "(docs/vfm_recipe.md)",
        default=None,
    )
    adapter_only: bool = option(
        "freeze the flow map and train the adapter alone (the paper's baseline)", default=False
    )
    adapter_channels: str = option("noise adapter block channels", default="32,64")
    adapter_layers: int = option("ResNet blocks per adapter stage", default=1)

    def validate(self) -> None:
        super().validate()
        tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        check(bool(tasks), "tasks", self.tasks, f"a comma-separated list of {sorted(OPERATORS)}")
        unknown = [t for t in tasks if t not in OPERATORS]
        check(not unknown, "tasks", self.tasks, f"unknown {unknown}; choose from {sorted(OPERATORS)}")
        check(len(set(tasks)) == len(tasks), "tasks", self.tasks, "each task once")
        check(self.measurement_sigma > 0, "measurement_sigma", self.measurement_sigma, "a positive number")
        check(self.tau > 0, "tau", self.tau, "a positive number")
        check(0 <= self.alpha <= 1, "alpha", self.alpha, "a probability in [0, 1]")
        check(self.adaptive_eps > 0, "adaptive_eps", self.adaptive_eps, "a positive number")
        try:
            channels = [int(c) for c in self.adapter_channels.split(",")]
        except ValueError:
            channels = []
        check(
            bool(channels) and min(channels) > 0,
            "adapter_channels",
            self.adapter_channels,
            'comma-separated positive integers, e.g. "32,64"',
        )
        check(self.adapter_layers >= 1, "adapter_layers", self.adapter_layers, "a positive integer")


@dataclass
class VFMTrainingConfig(FlowMapTrainingConfig, DataConfig, FlowMapConfig, VFMConfig):
    """Everything ``training/train_vfm.py --stage vfm`` (or ``adapter_only``) accepts."""

    output_dir: str = option("where checkpoints, logs and the final pipeline go", default="vfm-output")
    dataset: str = option("patches | digits | an image folder | shards | a precompute.py folder", default="patches")
    meanflow_adaptive_power: float = option(
        "p of the per-row MeanFlow weight 1 / sg(L_row + 1e-3)^p in the joint stage (default 0: plain rows, as the "
        "official VFM code; 1 multiplies the adapter-noise rows' pull on the map and its draws are more "
        "over-confident, docs/vfm_recipe.md)",
        default=0.0,
    )


class VFMTrainer(FlowMapTrainerBase):
    """Joint VFM training (module docstring).

    Examples:
        ```py
        >>> from diffusers_pafm import VFMTrainer, VFMTrainingConfig

        >>> config = VFMTrainingConfig(pretrained_model_name_or_path="flowmap-patches", tasks="box_inpaint")
        >>> VFMTrainer(config).train()  # doctest: +SKIP
        ```
    """

    config_class = VFMTrainingConfig
    log_keys = ("loss", "observation", "kl")

    def __init__(self, config: VFMTrainingConfig):
        if config.observation_trains_flow_map is None:  # resolved first, so the recorded run config says what ran
            config = dataclasses.replace(config, observation_trains_flow_map=not config.adapter_only)
        super().__init__(config)
        if config.observation_trains_flow_map and config.adapter_only:  # explicitly asked for
            raise ValueError("--observation_trains_flow_map trains the flow map; it cannot go with --adapter_only")
        if not config.pretrained_model_name_or_path:
            raise ValueError(
                "--pretrained_model_name_or_path is required: VFM trains the noise adapter against a trained flow map "
                "(train one first with train_vfm.py --stage meanflow, or pass a FM DiT / VFM pipeline folder)"
            )
        self.tasks = [t.strip() for t in config.tasks.split(",") if t.strip()]
        self.frozen_flow_map: FlowMapTransformer2DModel | None = None
        self.start_prior: torch.Tensor | None = None
        self.final_prior_drift: dict[str, float] | None = None

    def _adapter(self) -> NoiseAdapterModel:
        cfg, data = self.config, self.dataset
        folder = Path(cfg.pretrained_model_name_or_path or "")
        if cfg.pretrained_model_name_or_path and (folder / "noise_adapter" / "config.json").is_file():
            return NoiseAdapterModel.from_pretrained(folder, subfolder="noise_adapter", use_safetensors=True)
        resolution = data.meta.get("resolution", data.sample_shape[-1])
        return NoiseAdapterModel(
            in_channels=3 if self.vae is not None else data.sample_shape[0],
            sample_size=resolution,
            latent_channels=data.sample_shape[0],
            latent_size=data.sample_shape[-1],
            block_out_channels=[int(c) for c in self.config.adapter_channels.split(",")],
            layers_per_block=self.config.adapter_layers,
            num_tasks=len(self.tasks),
        )

    def build_models(self) -> dict[str, torch.nn.Module]:
        cfg = self.config
        flow_map = build_flow_map(cfg, self.dataset)
        self.meanflow = build_meanflow_loss(cfg, self.dataset, flow_map.config.num_embeds_ada_norm)
        self.loss_fn = VFMLoss(
            sigma=cfg.measurement_sigma,
            tau=cfg.tau,
            alpha=cfg.alpha,
            adaptive_eps=cfg.adaptive_eps,
            meanflow=self.meanflow,
            adapter_only=cfg.adapter_only,
            decode=self._decode if self.vae is not None else None,
        )
        adapter = self._adapter()
        if cfg.adapter_only:
            self.frozen_flow_map = flow_map.requires_grad_(False).eval()
            return {"noise_adapter": adapter}
        self.start_prior = unconditional_samples(flow_map.eval(), PRIOR_PROBE_SAMPLES, seed=cfg.seed).to(torch.float32)
        flow_map.train()
        return {"noise_adapter": adapter, "transformer": flow_map}

    def prior_drift(self, models) -> dict[str, float] | None:
        """:func:`~diffusers_pafm.evaluation.prior_drift` of the trained map's unconditional one-step samples against
        the starting map's (same noise): what the joint stage did to the map's prior (None with a frozen map)."""
        if self.start_prior is None:
            return None
        now = unconditional_samples(models["transformer"], PRIOR_PROBE_SAMPLES, seed=self.config.seed)
        return prior_drift(self.start_prior, now)

    def _prior_drift_log(self) -> Path:
        return Path(self.config.output_dir) / "prior_drift.jsonl"

    def _step_logs(self) -> list[Path]:
        return [*super()._step_logs(), self._prior_drift_log()]

    def validate(self):
        """The validation grid, and the prior drift logged beside it (``prior_drift.jsonl``, trackers)."""
        path = super().validate()
        acc = self.accelerator
        if acc.is_main_process and self.start_prior is not None:
            with self._sampling_models() as models:
                drift = self.prior_drift(models)
            with self._prior_drift_log().open("a") as f:
                f.write(json.dumps({"step": self.global_step, **drift}) + "\n")
            acc.log(drift, step=self.global_step)
        return path

    def _flow_map_module(self, models):
        return models["transformer"] if self.frozen_flow_map is None else self.frozen_flow_map

    def compute_loss(self, models, batch):
        cfg, acc = self.config, self.accelerator
        x = batch["x"]
        flow_map = self._flow_map_module(models)
        unwrapped = acc.unwrap_model(flow_map)
        null = unwrapped.config.num_embeds_ada_norm
        gen = self.process_generator
        labels = torch.full((x.shape[0],), null, device=x.device)
        pixels = self.pixels(x)
        task_ids = torch.randint(len(self.tasks), (x.shape[0],), generator=gen)
        measurement = Measurement.simulate(pixels, task_ids.to(x.device), self.tasks, cfg.measurement_sigma, gen)
        adapter_input = measurement.pseudo_inverse(pixels)
        out = self.loss_fn(
            FlowMapModel(flow_map),
            models["noise_adapter"],
            x,
            measurement,
            adapter_input,
            task_ids=task_ids.to(x.device),
            class_labels=labels,
            # theta- of the observation term; the trained map's forward runs outside DDP (its gradient joins the
            # same all-reduce)
            target_model=FlowMapModel(unwrapped) if cfg.observation_trains_flow_map else stop_gradient(unwrapped),
            jvp_model=FlowMapModel(unwrapped),
            generator=gen,
            flow_batch=flow_batch(batch, labels),
        )
        return out.loss, out.scalars()

    def pipeline(self, models) -> VariationalFlowMapPipeline:
        return VariationalFlowMapPipeline(
            noise_adapter=models["noise_adapter"],
            transformer=self._flow_map_module(models),
            scheduler=FlowMapEulerDiscreteScheduler(),
            vae=self.vae,
            tasks=self.tasks,
        )

    def validation_images(self, models) -> tuple[list[Image.Image], int]:
        """One row per task: observation A^+ y | 3 one-step samples | ground truth (first validation images)."""
        pipe = self.pipeline(models)
        pipe.set_progress_bar_config(disable=True)
        x = torch.stack([torch.as_tensor(self.dataset[i]["x"]) for i in range(len(self.tasks))]).to(
            self.accelerator.device
        )
        pixels = self.pixels(x)
        images, draws = [], 3
        gen = torch.Generator().manual_seed(self.config.seed)
        for i, task in enumerate(self.tasks):
            measurement = Measurement.simulate(
                pixels[i : i + 1], torch.zeros(1, dtype=torch.long), [task], self.config.measurement_sigma, gen
            )
            _, op, y = measurement.groups[0]
            view = op.pseudo_inverse(y)
            samples = pipe(
                y,
                op,
                num_images_per_prompt=draws,
                generator=gen,
                num_inference_steps=self.config.validation_inference_steps,
                observation_range=(-1, 1),
                output_type="pt",
            ).images
            images += _to_pil(view) + _to_pil(samples * 2 - 1) + _to_pil(pixels[i : i + 1])
        return images, draws + 2

    def model_card(self, repo_id: str) -> str | None:
        cfg = self.config
        return render_model_card(
            "vfm_model_card",
            **self.card_fields(repo_id),
            steps=cfg.validation_inference_steps,
            tasks=", ".join(self.tasks),
            first_task=self.tasks[0],
            sigma=cfg.measurement_sigma,
            prior=self._prior_text(),
        )

    def _prior_text(self) -> str:
        drift = self.final_prior_drift
        if drift is None:
            return "The flow map was frozen (adapter-only training): its unconditional samples are the starting map's."
        return (
            "The pipeline's `transformer` is the jointly trained flow map. Its unconditional one-step samples (fresh "
            f"noise passed as `latents=`, no observation) have {drift['prior_spread_ratio']:.2f} x the spread of the "
            f"starting map's samples from the same noise and a mean shift of {drift['prior_mean_shift']:.2f} of their "
            "std (1 and 0: the prior kept). "
            + ("" if _prior_kept(drift) else "For unconditional generation use the starting map.")
        ).strip()

    def export(self, models, directory: Path) -> None:
        self.pipeline(models).save_pretrained(directory)
        drift = self.final_prior_drift = self.prior_drift(models)
        if drift is not None and not _prior_kept(drift):
            self.accelerator.print(
                "note: the joint stage moved the flow map's prior: its unconditional one-step samples have "
                f"{drift['prior_spread_ratio']:.2f} x the spread of the starting map's (model card, 'Prior'); sample "
                "unconditionally from the starting map"
            )


def _prior_kept(drift: dict[str, float]) -> bool:
    return PRIOR_KEPT[0] <= drift["prior_spread_ratio"] <= PRIOR_KEPT[1]


def _to_pil(x: torch.Tensor) -> list[Image.Image]:
    return [to_pil(image) for image in x]
