"""One-step conditional generation / inverse problems with a Variational Flow Map.

observation y (measurement space) -> A^+ y (image space) -> noise adapter q(z | y, task) -> z -> flow map
(``num_inference_steps`` uniform steps, 1 by default: x = z - u(z, 1, 0)) -> VAE decode (if any) -> image.

``observation`` is what the sensor gives: the low-resolution image for super-resolution, the masked image (plus
``mask``, 1 = observed) for inpainting, the blurred / noisy image for deblurring / denoising. It takes what diffusers
pipelines take: PIL images, numpy arrays (HWC or NHWC; uint8 in 0..255 or float in 0..1), torch tensors (CHW or
NCHW, in ``observation_range``, (0, 1) by default), single or batched, or a list of any of these.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMapEulerDiscreteScheduler, ImagePipelineOutput, ModelMixin
from diffusers.image_processor import VaeImageProcessor

from ..flow_maps.operators import DegradationOperator, MaskOperator, build_operator
from .conventions import FlowMapSamplingMixin, PipelineConventionsMixin

__all__ = ["VariationalFlowMapPipeline"]

MASKED_TASKS = ("random_inpaint", "box_inpaint")
RANDOM_TASKS = ("motion_blur",)
"""tasks whose operator is drawn at random in training: a real observation needs the user's own operator"""

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_pafm import VariationalFlowMapPipeline

        >>> pipe = VariationalFlowMapPipeline.from_pretrained("demo_output/runs/vfm-patches")
        >>> low_res = torch.rand(1, 3, 8, 8)  # in [0, 1]
        >>> images = pipe(low_res, "super_resolution_2x", num_images_per_prompt=4).images  # one call per draw
        >>> mask = torch.ones(16, 16)
        >>> mask[4:10, 4:10] = 0  # 1 = observed
        >>> images = pipe(torch.rand(1, 3, 16, 16), "box_inpaint", mask=mask).images
        ```
"""


def _items(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class VariationalFlowMapPipeline(FlowMapSamplingMixin, PipelineConventionsMixin, DiffusionPipeline):
    """``VariationalFlowMapPipeline(noise_adapter, transformer, scheduler, vae=None, tasks=[...])``.

    Args:
        noise_adapter: a :class:`~diffusers_pafm.models.NoiseAdapterModel`.
        transformer: a two-time :class:`~diffusers_pafm.models.FlowMapTransformer2DModel`.
        scheduler: diffusers' ``FlowMapEulerDiscreteScheduler``.
        vae: optional ``AutoencoderKL`` when the flow map works on latents.
        tasks: the degradation names the adapter was trained on, in task-id order.
    """

    model_cpu_offload_seq = "noise_adapter->transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        noise_adapter: ModelMixin,
        transformer: ModelMixin,
        scheduler: FlowMapEulerDiscreteScheduler,
        vae: ModelMixin = None,
        tasks: list[str] | None = None,
    ):
        super().__init__()
        self.register_modules(noise_adapter=noise_adapter, transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(tasks=list(tasks or []))
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True, do_resize=False)

    # ---- properties diffusers pipelines expose ------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images the adapter reads and the pipeline returns."""
        config = self.noise_adapter.config
        return config.in_channels, config.sample_size, config.sample_size

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def _item_to_tensor(self, item, observation_range: tuple[float, float]) -> torch.Tensor:
        """One observation item as a float [N, C, H, W] tensor in [0, 1]."""
        channels = self.image_shape[0]
        if isinstance(item, PIL.Image.Image):
            item = item.convert("L" if channels == 1 else "RGB")
            return VaeImageProcessor.numpy_to_pt(VaeImageProcessor.pil_to_numpy(item))
        if isinstance(item, np.ndarray):
            array = item.astype(np.float32) / 255.0 if item.dtype == np.uint8 else item.astype(np.float32)
            array = array[..., None] if array.ndim == 2 else array
            if array.ndim not in (3, 4):
                raise ValueError(f"a numpy observation is HWC or NHWC; got shape {item.shape}")
            return VaeImageProcessor.numpy_to_pt(array[None] if array.ndim == 3 else array)
        if isinstance(item, torch.Tensor):
            x = item.detach().float().cpu()
            x = x[None] if x.ndim == 2 else x
            if x.ndim not in (3, 4):
                raise ValueError(f"a tensor observation is CHW or NCHW; got shape {tuple(item.shape)}")
            x = x[None] if x.ndim == 3 else x
            lo, hi = (float(v) for v in observation_range)
            if hi <= lo:
                raise ValueError(f"observation_range must be (low, high) with low < high, got {observation_range}")
            return (x - lo) / (hi - lo)
        raise ValueError(
            f"observation items must be PIL images, numpy arrays or torch tensors, got {type(item).__name__}"
        )

    def prepare_observation(self, observation, observation_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Any accepted observation as a [B, C, h, w] float tensor in [-1, 1] (values and range checked)."""
        items = _items(observation)
        if not items:
            raise ValueError("observation is empty; pass at least one image")
        tensors = [self._item_to_tensor(item, observation_range) for item in items]
        if len({tuple(t.shape[1:]) for t in tensors}) > 1:
            raise ValueError(f"observations of different shapes {sorted({tuple(t.shape[1:]) for t in tensors})}")
        x = torch.cat(tensors)
        if not torch.isfinite(x).all():
            raise ValueError(f"observation holds {int((~torch.isfinite(x)).sum())} NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if low < -0.5 or high > 1.5:  # measurement noise may leave [0, 1] a little; a wrong range leaves it far
            raise ValueError(
                f"observation values span [{low:.3g}, {high:.3g}] after mapping observation_range={observation_range} "
                "to [0, 1]; pass images in [0, 1] (uint8 arrays in 0..255) or set observation_range, e.g. (-1, 1)"
            )
        return self.image_processor.normalize(x)

    def prepare_mask(self, mask, batch_size: int) -> torch.Tensor:
        """A binary [B, 1, H, W] mask (1 = observed) from PIL / numpy / torch masks (0/1, 0/255 or bool)."""
        _, height, width = self.image_shape
        masks = []
        for item in _items(mask):
            if isinstance(item, PIL.Image.Image):
                item = np.asarray(item.convert("L"))
            m = torch.as_tensor(np.array(item) if not isinstance(item, torch.Tensor) else item).float().cpu()
            if m.numel() and m.max() > 1:  # 0..255
                m = m / 255.0
            m = m.reshape(-1, 1, *m.shape[-2:]) if m.ndim >= 2 else m
            if m.ndim != 4 or tuple(m.shape[-2:]) != (height, width):
                raise ValueError(f"mask of shape {tuple(m.shape)}; expected (H, W) = ({height}, {width}) per image")
            masks.append(m)
        m = torch.cat(masks)
        if m.shape[0] not in (1, batch_size):
            raise ValueError(f"{m.shape[0]} masks for {batch_size} observations; pass one mask or one per observation")
        return (m > 0.5).float().expand(batch_size, 1, height, width).contiguous()

    def operator_for(self, task: str | DegradationOperator, batch_size: int, mask=None) -> DegradationOperator:
        """The degradation for ``task``: the given operator, a mask operator for inpainting, or the named one."""
        if isinstance(task, DegradationOperator):
            if mask is not None:
                raise ValueError("pass the mask inside your DegradationOperator or a task name with mask=, not both")
            op = task
        elif not isinstance(task, str):
            raise ValueError(f"task must be a task name or a DegradationOperator, got {type(task).__name__}")
        elif task not in self.config.tasks:
            raise ValueError(f"unknown task {task!r}; this pipeline was trained for {self.config.tasks}")
        elif task in MASKED_TASKS:
            if mask is None:
                raise ValueError(f"task {task!r} needs mask= (1 = observed pixel) with the masked observation")
            op = MaskOperator(self.prepare_mask(mask, batch_size), task)
        elif task in RANDOM_TASKS:
            raise ValueError(
                f"task {task!r} draws a random kernel per sample in training; pass a DegradationOperator that holds "
                "the kernel of your observation as task="
            )
        else:
            if mask is not None:
                raise ValueError(f"mask= belongs to the inpainting tasks {MASKED_TASKS}, not {task!r}")
            op = build_operator(task, (batch_size, *self.image_shape))
        if op.name not in self.config.tasks:
            raise ValueError(f"unknown task {op.name!r}; this pipeline was trained for {self.config.tasks}")
        return op

    def _observation_shape(self, op: DegradationOperator, batch_size: int) -> tuple[int, ...]:
        try:
            return tuple(op(torch.zeros(batch_size, *self.image_shape)).shape[1:])
        except RuntimeError as error:
            raise ValueError(
                f"the operator {op.name!r} does not apply to {batch_size} images of {self.image_shape}: {error}"
            ) from None

    # ---- call -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        observation=None,
        task: str | DegradationOperator | None = None,
        mask=None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        class_labels: int | list[int] | None = None,
        temperature: float = 1.0,
        observation_range: tuple[float, float] = (0.0, 1.0),
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Posterior samples for each observation: ``num_images_per_prompt`` draws each, grouped by observation.

        Args:
            observation: the measurement y (module docstring for the accepted types). Not needed with ``latents``.
            task: a task name of ``pipe.config.tasks`` or a :class:`~diffusers_pafm.DegradationOperator` for y
                (its ``name`` selects the adapter's task).
            mask: inpainting mask(s), 1 = observed: PIL, numpy or torch, (H, W) per image, 0/1, 0/255 or bool.
            num_images_per_prompt: posterior draws per observation.
            num_inference_steps: flow-map steps (1: x = z - u(z, 1, 0), one transformer call).
            generator: a ``torch.Generator`` or one per draw (``len == batch x num_images_per_prompt``).
            latents: z itself, [draws, C, H, W] in the flow map's space: bypasses the adapter. Fresh N(0, I) latents
                sample the jointly trained map unconditionally (its drift from the starting map: the model card).
            noise: the adapter's standard-normal eps (z = mean + temperature x std x eps), [draws, C, H, W].
            class_labels: one label or one per draw for class-conditional flow maps (default: the null class).
            temperature: scales the adapter's std (0: its mean).
            observation_range: value range of tensor observations, (0, 1) or e.g. (-1, 1).
            output_type: "pil", "np", "pt" (in [0, 1]) or "latent".
            callback_on_step_end: ``callback(pipe, step, timestep, callback_kwargs) -> dict`` after each step;
                it may replace the tensors it returns (``callback_on_step_end_tensor_inputs``, default latents).
        """
        tensor_inputs = self.check_call_inputs(
            num_images_per_prompt, num_inference_steps, output_type, callback_on_step_end_tensor_inputs
        )
        if not temperature >= 0:
            raise ValueError(f"temperature scales the adapter's std and must be >= 0, got {temperature}")
        device = self._execution_device
        flow_shape = (
            self.transformer.config.in_channels,
            self.transformer.config.sample_size,
            self.transformer.config.sample_size,
        )
        if latents is None:
            if observation is None or task is None:
                raise ValueError("pass observation= and task= (or latents= to bypass the noise adapter)")
            y = self.prepare_observation(observation, observation_range)
            batch = y.shape[0]
            op = self.operator_for(task, batch, mask)
            expected = self._observation_shape(op, batch)
            if tuple(y.shape[1:]) != expected:
                raise ValueError(
                    f"observation of shape {tuple(y.shape[1:])} (C, H, W; tensors are channel-first) but task "
                    f"{op.name!r} observes {expected} for images of {self.image_shape}"
                )
            op = op.to(device)
            adapter_input = op.pseudo_inverse(y.to(device)).repeat_interleave(num_images_per_prompt, 0)
            draws = adapter_input.shape[0]
            if isinstance(generator, list) and len(generator) != draws:
                raise ValueError(f"{len(generator)} generators for {draws} draws ({batch} x {num_images_per_prompt})")
            task_ids = torch.full((draws,), self.config.tasks.index(op.name), device=device)
            q = self.noise_adapter(adapter_input.to(self.noise_adapter.dtype), task_ids)
            z = q.sample(generator=generator, temperature=temperature, noise=noise)
        else:
            if tuple(latents.shape[1:]) != flow_shape:
                raise ValueError(
                    f"latents of shape {tuple(latents.shape)}; expected [draws, {', '.join(map(str, flow_shape))}]"
                )
            if not torch.isfinite(latents).all():
                raise ValueError("latents hold NaN or infinite values")
            z = latents.to(device)
        labels = self._labels(class_labels, z.shape[0], device)
        x = self.run_flow_map(z, labels, num_inference_steps, callback_on_step_end, tensor_inputs)
        images = self.postprocess(x, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


VariationalFlowMapPipeline.__call__.__doc__ += EXAMPLE_DOC_STRING
