"""One protocol for scoring posterior samplers on image inverse problems (the demo, examples and benchmarks use it).

For held-out images x in [-1, 1]: draw the task's operator A with a seeded generator, observe y = A x + sigma n, ask
the sampler for J draws per observation, and report PSNR / SSIM of the mean of the draws, PSNR of the pseudo-inverse
A^+ y (the "do nothing" reference), CRPS (energy form over the whole image), how well the draws explain the
observation (RMS of A x_j - y over the observed entries, in units of sigma: the truth itself scores about 1, a draw
that ignores the observation scores far more) and seconds per draw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from ..data.encoding import image_to_tensor
from ..data.patches import make_patches
from ..flow_maps.flow_map import FlowMapModel, sample_flow_map
from ..flow_maps.guidance import dps_sample
from ..flow_maps.operators import DegradationOperator, build_operator
from ..utils.images import image_grid, to_pil
from .metrics import crps, interval_coverage, mmd, psnr, ssim

__all__ = [
    "heldout_patches",
    "InverseProblemResult",
    "evaluate_inverse_problem",
    "pipeline_sampler",
    "dps_pipeline_sampler",
    "unconditional_samples",
]

# sampler(observation y, operator A, num_draws J, generator) -> draws [B, J, C, H, W] in [-1, 1]
PosteriorSampler = Callable[[torch.Tensor, DegradationOperator, int, torch.Generator], torch.Tensor]


def heldout_patches(num_images: int, resolution: int, seed: int, channels: int = 3) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1]: new crops of the scikit-image photographs; training uses seeds 0, 1, ..., so
    evaluations draw theirs at 10 000 + seed (tests) and 20 000 + seed (validation)."""
    crops, _ = make_patches(num_images, resolution=resolution, seed=seed)
    return torch.stack([image_to_tensor(image, resolution, channels) for image in crops])


@torch.no_grad()
def unconditional_samples(
    transformer: torch.nn.Module, num_images: int, seed: int, num_inference_steps: int = 1
) -> torch.Tensor:
    """[N, C, H, W]: a two-time flow map's own samples from N(0, I) noise (null class), no observation: the prior a
    VFM stage starts from or leaves behind (compare before and after joint training to see prior damage)."""
    cfg = transformer.config
    noise = torch.randn(
        (num_images, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=torch.Generator().manual_seed(seed)
    )
    device = next(transformer.parameters()).device
    null = torch.full((num_images,), cfg.num_embeds_ada_norm, device=device)
    x = sample_flow_map(FlowMapModel(transformer), noise.to(device), num_inference_steps, class_labels=null)
    return x.cpu()


@dataclass
class InverseProblemResult:
    """Truth x [B, C, H, W], observation y = A x + sigma n, the pseudo-inverse A^+ y and the draws [B, J, C, H, W],
    all in [-1, 1]."""

    task: str
    truth: torch.Tensor
    observation: torch.Tensor
    pseudo_inverse: torch.Tensor
    draws: torch.Tensor
    seconds: float
    operator: DegradationOperator
    measurement_sigma: float

    def observation_residual(self) -> torch.Tensor:
        """[B, J]: RMS of A x_j - y over the observed entries of y (where A 1 != 0), divided by sigma."""
        b, j = self.draws.shape[:2]
        rows = torch.arange(b).repeat_interleave(j)
        predicted = self.operator.select(rows)(self.draws.flatten(0, 1)).view(b, j, *self.observation.shape[1:])
        observed = (self.operator(torch.ones_like(self.truth)) != 0).float().unsqueeze(1)
        squares = ((predicted - self.observation.unsqueeze(1)) ** 2 * observed).flatten(2).sum(-1)
        count = observed.expand_as(predicted).flatten(2).sum(-1).clamp(min=1)
        return (squares / count).sqrt() / self.measurement_sigma

    def spread_over_error(self) -> float:
        """sqrt(mean draw variance) / RMS error of the draws' mean, corrected for J draws (E = 1 if calibrated).

        A calibrated posterior gives E|mean_J - x|^2 = var (1 + 1/J) per pixel; < 1 means over-confident draws."""
        j = self.draws.shape[1]
        variance = self.draws.var(1, unbiased=True).mean()
        error = (self.draws.mean(1) - self.truth).pow(2).mean() / (1 + 1 / j)
        return float(variance.sqrt() / error.sqrt().clamp(min=1e-12))

    def coverage(self, level: float) -> float:
        """Fraction of pixels whose truth lies in the draws' central ``level`` interval (randomised rank, exact at
        any J: :func:`~.metrics.interval_coverage`)."""
        return interval_coverage(self.draws, self.truth, level)

    def metrics(self) -> dict[str, float]:
        mean = self.draws.mean(1)
        return {
            "psnr_posterior_mean": float(psnr(mean, self.truth).mean()),
            "ssim_posterior_mean": float(ssim(mean, self.truth).mean()),
            "psnr_pseudo_inverse": float(psnr(self.pseudo_inverse.clamp(-1, 1), self.truth).mean()),
            "crps": float(crps(self.draws.flatten(2), self.truth.flatten(1)).mean()),
            "observation_residual_over_sigma": float(self.observation_residual().mean()),
            "spread_over_error": self.spread_over_error(),
            "coverage_50": self.coverage(0.5),
            "coverage_90": self.coverage(0.9),
            # the pooled draws against the pooled truths: do the samples look like the data, image for image?
            "mmd_draws_to_truths": float(mmd(self.draws.flatten(0, 1).flatten(1), self.truth.flatten(1))),
            "seconds_per_sample": self.seconds / (self.draws.shape[0] * self.draws.shape[1]),
        }

    def grid(self, scale: int = 4) -> Image.Image:
        """One row per image: A^+ y | draws | their mean | truth."""
        tiles = []
        for view, draws, truth in zip(self.pseudo_inverse, self.draws, self.truth):
            tiles += [to_pil(view), *[to_pil(d) for d in draws], to_pil(draws.mean(0)), to_pil(truth)]
        return image_grid(tiles, rows=len(self.truth), cols=self.draws.shape[1] + 3, scale=scale)


def evaluate_inverse_problem(
    sampler: PosteriorSampler,
    truth: torch.Tensor,
    task: str,
    measurement_sigma: float = 0.05,
    num_draws: int = 8,
    seed: int = 0,
) -> InverseProblemResult:
    """Degrade ``truth`` with ``task`` (operator and noise seeded by ``seed``) and time ``num_draws`` draws each."""
    generator = torch.Generator().manual_seed(seed)
    operator = build_operator(task, truth.shape, generator)
    y = operator(truth)
    y = y + measurement_sigma * torch.randn(y.shape, generator=generator)
    start = time.perf_counter()
    draws = sampler(y, operator, num_draws, torch.Generator().manual_seed(seed + 1))
    seconds = time.perf_counter() - start
    expected = (truth.shape[0], num_draws, *truth.shape[1:])
    if tuple(draws.shape) != expected:
        raise ValueError(f"the sampler returned draws of shape {tuple(draws.shape)}, expected {expected}")
    pseudo_inverse = operator.pseudo_inverse(y)
    return InverseProblemResult(task, truth, y, pseudo_inverse, draws.float(), seconds, operator, measurement_sigma)


def pipeline_sampler(pipe, num_inference_steps: int = 1, clip: bool = True) -> PosteriorSampler:
    """A :class:`~diffusers_pafm.VariationalFlowMapPipeline` as a sampler (one forward pass per draw by default).

    ``clip=False`` returns the flow map's output unclipped (pixel-space pipelines only), for references whose
    values leave [-1, 1] (a Gaussian prior)."""
    if not clip and pipe.vae is not None:
        raise ValueError("clip=False returns the flow map's raw output, which is latents for a pipeline with a VAE")

    def sample(y, operator, num_draws, generator):
        images = pipe(
            y,
            operator,
            num_images_per_prompt=num_draws,
            num_inference_steps=num_inference_steps,
            generator=generator,
            observation_range=(-1, 1),
            output_type="pt" if clip else "latent",
        ).images
        images = images * 2 - 1 if clip else images  # "pt" output is in [0, 1]
        return images.view(y.shape[0], num_draws, *images.shape[1:])

    return sample


def dps_pipeline_sampler(pipe, num_inference_steps: int = 100, guidance_scale: float = 0.5) -> PosteriorSampler:
    """The DPS-style baseline (:func:`~diffusers_pafm.dps_sample`) on a VFM pipeline's flow map, from N(0, I) noise
    (null class): the same prior as the one-step sampler, without the noise adapter."""
    model = FlowMapModel(pipe.transformer)
    null = pipe.transformer.config.num_embeds_ada_norm

    def sample(y, operator, num_draws, generator):
        b = y.shape[0]
        rows = torch.arange(b).repeat_interleave(num_draws)
        image_shape = operator.pseudo_inverse(y).shape[1:]  # y itself is smaller for super-resolution
        noise = torch.randn((b * num_draws, *image_shape), generator=generator)
        labels = torch.full((b * num_draws,), null)
        draws = dps_sample(
            model, operator.select(rows), y[rows], noise, num_inference_steps, guidance_scale, class_labels=labels
        )
        return draws.view(b, num_draws, *draws.shape[1:])

    return sample
