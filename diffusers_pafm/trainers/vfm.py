"""VFMTrainer: MeanFlow training of a flow map, then joint VFM training of a noise adapter with it.

Stages (``--stage``), all on the same engine as :class:`~.pafm.PAFMTrainer`:

* ``meanflow`` - train a two-time flow map with the MeanFlow objective (start from a PAFMTrainer FM pipeline /
  DiT folder with ``--pretrained_model_name_or_path``: the flow map then starts equal to that FM model). With
  ``--one_step_distillation_weight w`` (from a trained map) the loss adds w x
  :class:`~diffusers_pafm.OneStepDistillation`: the one-step map regressed onto the starting map's own
  ``--distillation_teacher_steps``-step samples.
* ``vfm`` (default) - joint training of ``noise_adapter`` and ``transformer`` with :class:`~diffusers_pafm.VFMLoss`
  over the degradations in ``--tasks`` (each sample draws a task and fresh operator randomness).
* ``adapter_only`` - the paper's baseline: the flow map is frozen and only the adapter learns.

Data flows: images -> (VAE latents) -> x; pixels -> task operator -> y = A x + sigma eta -> A^+ y -> adapter -> z
-> flow map. Export: a :class:`~diffusers_pafm.VariationalFlowMapPipeline` (``meanflow``: the flow map alone in
``transformer/``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from diffusers import FlowMapEulerDiscreteScheduler
from PIL import Image

from ..data import EncodedDataset
from ..flow_map import FlowMapModel, MeanFlowLoss, OneStepDistillation, TwoTimeSampler
from ..models import FlowMapTransformer2DModel, NoiseAdapterModel, build_dit
from ..operators import Measurement
from ..pipelines import VariationalFlowMapPipeline
from ..vfm import VFMLoss, stop_gradient
from .engine import DataConfig, Trainer, TrainingConfig, _help

__all__ = ["VFMTrainingConfig", "VFMTrainer", "STAGES"]

STAGES = ("meanflow", "vfm", "adapter_only")
NEW_MAP_OPTIONS = ("prediction_type", "time_embedding_scale")
"""options that shape a flow map trained from scratch (a pretrained map keeps its own)"""


@dataclass
class VFMTrainingConfig(TrainingConfig, DataConfig):
    """Everything ``training/train_vfm.py`` accepts."""

    output_dir: str = _help("where checkpoints, logs and the final pipeline go", default="vfm-output")
    dataset: str = _help("patches | digits | an image folder | shards | a precompute.py folder", default="patches")
    stage: str = _help("meanflow | vfm | adapter_only", default="vfm")
    pretrained_model_name_or_path: str | None = _help(
        "flow map / FM DiT / pipeline folder to start from (a VFM pipeline folder also provides the adapter)",
        default=None,
    )
    model_size: str = _help("DiT size for a flow map trained from scratch", default="tiny")
    patch_size: int = _help("DiT patch size", default=2)
    prediction_type: str = _help(
        'flow map from scratch: "velocity" (the network outputs u) or "sample" (x-prediction: it outputs the '
        "endpoint x_hat and u = (x_t - x_hat) / max(t, 0.05)); a pretrained map keeps its own",
        default="velocity",
    )
    time_embedding_scale: float = _help(
        "flow map from scratch: the sinusoidal time embedders see this x t (1000 = diffusers' DiT timesteps; 1 = raw "
        "t as in SiT and the official MeanFlow / VFM code, whose smoother embedding keeps the MeanFlow JVP du/dt "
        "small); a pretrained map keeps its own",
        default=1000.0,
    )
    tasks: str = _help(
        "comma-separated degradations: denoise, random_inpaint, box_inpaint, super_resolution_2x, "
        "super_resolution_4x, gaussian_blur, motion_blur",
        default="box_inpaint,super_resolution_2x",
    )
    measurement_sigma: float = _help("observation noise sigma (images in [-1, 1])", default=0.05)
    tau: float = _help("data-misfit tolerance of the flow-map term (tau > sigma)", default=1.0)
    alpha: float = _help("probability that the flow-map term uses adapter noise", default=0.8)
    adaptive_eps: float = _help("c in L / sg(L + c)", default=0.01)
    meanflow_adaptive_power: float = _help(
        "joint stage: p of the MeanFlow term's own per-sample weighting 1 / sg(L_row + 1e-3)^p before the sum is "
        "normalised (0 = the official code; 1 = the weighting of the meanflow stage, which keeps large-error rows of "
        "an x-prediction map from dominating)",
        default=0.0,
    )
    flow_map_lr_scale: float = _help(
        "flow-map lr / adapter lr in the joint VFM stage (< 1: the pre-trained map moves slower)",
        default=1.0,
    )
    observation_trains_flow_map: bool = _help(
        "joint stage: the observation term's gradient reaches the flow map too (the official code's "
        "--data-loss-learn-fm learn; a tiny map then fits observations far better). Default: the term sees a "
        "stop-gradient copy theta- and only the MeanFlow term moves the map, as in the paper",
        default=False,
    )
    adapter_channels: str = _help("noise adapter block channels", default="32,64")
    adapter_layers: int = _help("ResNet blocks per adapter stage", default=1)
    r_neq_t: float = _help("fraction of MeanFlow pairs with r != t", default=0.25)
    mf_time_sampling: str = _help(
        'MeanFlow density of t, r: "logit_normal" (the MeanFlow ImageNet default) or "uniform" (short runs: the '
        "one-step corner t = 1, r = 0 is trained as often as the rest)",
        default="logit_normal",
    )
    one_step_distillation_weight: float = _help(
        "meanflow stage: weight of the one-step self-distillation term on fixed pairs (z, x_K(z)) of the starting map "
        "(null label); 0 = off. Use it on a trained map (--pretrained_model_name_or_path)",
        default=0.0,
    )
    distillation_teacher_steps: int = _help("K of the distillation teacher's samples x_K(z)", default=16)
    distillation_pairs: int = _help("number of fixed distillation pairs (z, x_K(z))", default=1024)
    mf_logit_mean: float = _help("MeanFlow logit-normal mean of t, r", default=-0.4)
    mf_logit_std: float = _help("MeanFlow logit-normal std", default=1.0)
    jvp: str = _help('"jvp" (forward AD, MATH attention) or "finite_difference"', default="jvp")
    class_dropout: float = _help("label dropout of the MeanFlow stage (class-conditional data)", default=0.1)
    validation_inference_steps: int = _help("flow-map steps for validation samples", default=1)


class VFMTrainer(Trainer):
    """Flow-map and VFM training (module docstring)."""

    config_class = VFMTrainingConfig
    log_keys = ("loss", "observation", "kl")

    def __init__(self, config: VFMTrainingConfig):
        super().__init__(config)
        if config.stage not in STAGES:
            raise ValueError(f"unknown --stage {config.stage!r}; choose one of {STAGES}")
        if config.one_step_distillation_weight and config.stage != "meanflow":
            raise ValueError(f"--one_step_distillation_weight belongs to --stage meanflow, not {config.stage!r}")
        if config.observation_trains_flow_map and config.stage != "vfm":
            raise ValueError(f"--observation_trains_flow_map belongs to --stage vfm, not {config.stage!r}")
        self.tasks = [t.strip() for t in config.tasks.split(",") if t.strip()]
        self.vae = None
        self.frozen_flow_map: FlowMapTransformer2DModel | None = None
        self.distillation: OneStepDistillation | None = None

    def build_dataset(self) -> EncodedDataset:
        dataset, encoders = self.prepare_data()
        self.vae = encoders.vae
        self.dataset = dataset
        return dataset

    def _flow_map(self) -> FlowMapTransformer2DModel:
        cfg, data = self.config, self.dataset
        if cfg.pretrained_model_name_or_path:
            folder = Path(cfg.pretrained_model_name_or_path)
            sub = "transformer" if (folder / "transformer" / "config.json").is_file() else None
            flow_map = FlowMapTransformer2DModel.from_pretrained(folder, subfolder=sub)
            defaults = {f.name: f.default for f in fields(cfg)}
            for option in NEW_MAP_OPTIONS:  # a pretrained map keeps its own; a different explicit value is an error
                requested, own = getattr(cfg, option), flow_map.config[option]
                if requested != defaults[option] and requested != own:
                    raise ValueError(
                        f"--{option} {requested} applies to a new flow map; {folder} has {option}={own!r} (leave "
                        f"--{option} at its default to keep it)"
                    )
            return flow_map
        num_classes = data.num_classes or 1
        dit = build_dit(cfg.model_size, data.sample_shape[0], data.sample_shape[-1], num_classes, cfg.patch_size)
        return FlowMapTransformer2DModel.from_flow_matching(
            dit, prediction_type=cfg.prediction_type, time_embedding_scale=cfg.time_embedding_scale
        )

    def _adapter(self) -> NoiseAdapterModel:
        cfg, data = self.config, self.dataset
        folder = Path(cfg.pretrained_model_name_or_path or "")
        if cfg.pretrained_model_name_or_path and (folder / "noise_adapter" / "config.json").is_file():
            return NoiseAdapterModel.from_pretrained(folder, subfolder="noise_adapter")
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
        flow_map = self._flow_map()
        config = flow_map.config
        self.dataset.check(
            sample_shape=(config.in_channels, config.sample_size, config.sample_size),
            num_classes=config.num_embeds_ada_norm,
        )
        times = TwoTimeSampler(
            scheme=cfg.mf_time_sampling, logit_mean=cfg.mf_logit_mean, logit_std=cfg.mf_logit_std, r_neq_t=cfg.r_neq_t
        )
        if cfg.stage == "meanflow":
            self.meanflow = MeanFlowLoss(times, mode=cfg.jvp)
            if cfg.one_step_distillation_weight > 0:
                self.distillation = self._distillation_pairs(flow_map)
            return {"transformer": flow_map}
        self.loss_fn = VFMLoss(
            sigma=cfg.measurement_sigma,
            tau=cfg.tau,
            alpha=cfg.alpha,
            adaptive_eps=cfg.adaptive_eps,
            meanflow=MeanFlowLoss(times, adaptive_power=cfg.meanflow_adaptive_power, mode=cfg.jvp),
            adapter_only=cfg.stage == "adapter_only",
            decode=self._decode if self.vae is not None else None,
        )
        adapter = self._adapter()
        if cfg.stage == "adapter_only":
            self.frozen_flow_map = flow_map.requires_grad_(False).eval()
            return {"noise_adapter": adapter}
        return {"noise_adapter": adapter, "transformer": flow_map}

    @torch.no_grad()
    def _distillation_pairs(self, flow_map: FlowMapTransformer2DModel) -> OneStepDistillation:
        """(z, x_K(z)) of the starting map with the run's seed: the same on every process and after a resume."""
        cfg, device = self.config, self.accelerator.device
        noise = torch.randn(
            (cfg.distillation_pairs, *self.dataset.sample_shape), generator=torch.Generator().manual_seed(cfg.seed)
        )
        labels = torch.full((cfg.distillation_pairs,), flow_map.config.num_embeds_ada_norm, device=device)
        flow_map.to(device).eval()
        pairs = OneStepDistillation.from_model(
            FlowMapModel(flow_map), noise.to(device), cfg.distillation_teacher_steps, labels, batch_size=256
        )
        flow_map.train()
        return pairs

    def parameter_groups(self, models: dict[str, torch.nn.Module]) -> list[dict]:
        """Joint stage: the flow map trains at ``flow_map_lr_scale`` x the adapter's learning rate."""
        if "transformer" not in models or "noise_adapter" not in models:
            return super().parameter_groups(models)
        lr = self.config.learning_rate * self.config.flow_map_lr_scale
        return [
            {"params": self._trainable({"noise_adapter": models["noise_adapter"]})},
            {"params": self._trainable({"transformer": models["transformer"]}), "lr": lr},
        ]

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        return self.vae.decode(latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)).sample

    def _flow_map_module(self, models):
        return models["transformer"] if self.frozen_flow_map is None else self.frozen_flow_map

    def compute_loss(self, models, batch):
        cfg, acc = self.config, self.accelerator
        x = batch["x"]
        flow_map = self._flow_map_module(models)
        unwrapped = acc.unwrap_model(flow_map)
        null = unwrapped.config.num_embeds_ada_norm
        if cfg.stage == "meanflow":
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
            )
            scalars = out.scalars()
            scalars, loss = {"loss": scalars["loss"], "mse": scalars["mse"]}, out.loss
            if self.distillation is not None:  # one forward outside DDP: its gradient joins the same all-reduce
                one_step = self.distillation.loss(FlowMapModel(unwrapped), x.shape[0], self.process_generator)
                loss = loss + cfg.one_step_distillation_weight * one_step
                scalars.update(loss=float(loss.detach()), meanflow=scalars["loss"], one_step=float(one_step.detach()))
            return loss, scalars
        gen = self.process_generator
        labels = torch.full((x.shape[0],), null, device=x.device)
        pixels = x if self.vae is None else self._pixels(x)
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
            # same all-reduce, as for the distillation term)
            target_model=FlowMapModel(unwrapped) if cfg.observation_trains_flow_map else stop_gradient(unwrapped),
            jvp_model=FlowMapModel(unwrapped),
            generator=gen,
        )
        return out.loss, out.scalars()

    @torch.no_grad()
    def _pixels(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(latents.to(self.vae.dtype)).float()

    # ---- validation and export -----------------------------------------------------------------------------
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
        if self.config.stage == "meanflow":
            from ..flow_map import sample_flow_map

            gen = torch.Generator().manual_seed(self.config.seed)
            fm = models["transformer"]
            shape = (8, *self.dataset.sample_shape)
            labels = torch.full((8,), fm.config.num_embeds_ada_norm)
            x = sample_flow_map(
                FlowMapModel(fm), torch.randn(shape, generator=gen).to(fm.device), 1, labels.to(fm.device)
            )
            return _to_pil(x if self.vae is None else self._pixels(x)), 8
        pipe = self.pipeline(models)
        pipe.set_progress_bar_config(disable=True)
        x = torch.stack([torch.as_tensor(self.dataset[i]["x"]) for i in range(len(self.tasks))]).to(
            self.accelerator.device
        )
        pixels = x if self.vae is None else self._pixels(x)
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
                task,
                mask=getattr(op, "mask", None),
                num_images_per_prompt=draws,
                generator=gen,
                num_inference_steps=self.config.validation_inference_steps,
                observation_range=(-1, 1),
                output_type="pt",
            ).images
            images += _to_pil(view) + _to_pil(samples * 2 - 1) + _to_pil(pixels[i : i + 1])
        return images, draws + 2

    def model_card(self, repo_id: str) -> str | None:
        if self.config.stage == "meanflow":
            return None
        import json

        from ..hub import render_model_card

        cfg = self.config
        training = {k: v for k, v in cfg.to_dict().items() if v is not None and k not in ("output_dir", "logging_dir")}
        return render_model_card(
            "vfm_model_card",
            license="apache-2.0",
            dataset=cfg.dataset,
            model_name=repo_id,
            repo_id=repo_id,
            steps=cfg.validation_inference_steps,
            tasks=", ".join(self.tasks),
            first_task=self.tasks[0],
            sigma=cfg.measurement_sigma,
            training_config="```json\n" + json.dumps(training, indent=2) + "\n```",
        )

    def export(self, models, directory: Path) -> None:
        if self.config.stage == "meanflow":
            models["transformer"].save_pretrained(directory / "transformer")
            return
        self.pipeline(models).save_pretrained(directory)


def _to_pil(x: torch.Tensor) -> list[Image.Image]:
    array = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in array]
