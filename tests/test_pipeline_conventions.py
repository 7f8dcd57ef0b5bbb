"""Both pipelines against the conventions diffusers' own pipeline tests check: input types (PIL / numpy / torch,
single / batched / lists) give the same images, batches equal their rows, num_images_per_prompt groups draws,
latents / callbacks / interrupt / num_timesteps, and every bad input is a ValueError that names what was expected."""

import numpy as np
import pytest
import torch
from diffusers import FlowMapEulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from PIL import Image

from diffusers_pafm import (
    FlowMapModel,
    FlowMapTransformer2DModel,
    FlowMatchingPipeline,
    NoiseAdapterModel,
    OpenCLIPTextEncoder,
    VariationalFlowMapPipeline,
    build_dit,
    build_sd3,
    one_step,
    tiny_clip_config,
)
from diffusers_pafm.flow_maps import DegradationOperator, build_operator

TASKS = ["box_inpaint", "super_resolution_2x", "gaussian_blur", "denoise", "motion_blur"]


@pytest.fixture(scope="module")
def vfm_pipe():
    torch.manual_seed(0)
    flow_map = FlowMapTransformer2DModel.from_flow_matching(build_dit("test", 3, 16, 1, patch_size=4)).eval()
    adapter = NoiseAdapterModel(
        in_channels=3, sample_size=16, latent_channels=3, latent_size=16, block_out_channels=[8, 16], num_tasks=5
    ).eval()
    torch.nn.init.normal_(adapter.conv_out.weight, std=0.05)  # the zero-initialised head would ignore y
    for p in flow_map.parameters():  # a zero-initialised DiT output would ignore z
        if p.ndim >= 2 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    pipe = VariationalFlowMapPipeline(adapter, flow_map, FlowMapEulerDiscreteScheduler(), tasks=TASKS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _uint8_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _noise(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, 3, 16, 16), generator=torch.Generator().manual_seed(seed))


def test_vfm_observation_types_give_identical_images(vfm_pipe):
    arrays = _uint8_images(2, 8)  # a 2x super-resolution observation of 16 x 16 images
    unit = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255
    forms = {
        "pil list": [Image.fromarray(a) for a in arrays],
        "uint8 NHWC": arrays,
        "uint8 list": list(arrays),
        "float NHWC": arrays.astype(np.float32) / 255,
        "tensor NCHW": unit,
        "tensor list CHW": list(unit),
        "tensor in [-1, 1]": (unit * 2 - 1, {"observation_range": (-1, 1)}),
        "tensor in [0, 255]": (unit * 255, {"observation_range": (0, 255)}),
    }
    outputs = {}
    for name, form in forms.items():
        value, extra = form if isinstance(form, tuple) else (form, {})
        outputs[name] = vfm_pipe(value, "super_resolution_2x", noise=_noise(2), output_type="np", **extra).images
    reference = outputs.pop("tensor NCHW")
    assert reference.shape == (2, 16, 16, 3)
    for name, images in outputs.items():
        np.testing.assert_allclose(images, reference, atol=1e-5, err_msg=name)


def test_vfm_batch_equals_rows_and_draws_group_by_observation(vfm_pipe):
    y = torch.from_numpy(_uint8_images(3, 16)).permute(0, 3, 1, 2).float() / 255
    noise = _noise(6)
    batch = vfm_pipe(y, "gaussian_blur", num_images_per_prompt=2, noise=noise, output_type="pt").images
    assert batch.shape == (6, 3, 16, 16)
    for i in range(3):  # rows 2i, 2i+1 are the draws of observation i
        single = vfm_pipe(y[i], "gaussian_blur", num_images_per_prompt=2, noise=noise[2 * i : 2 * i + 2]).images
        single = vfm_pipe.image_processor.pil_to_numpy(single)
        np.testing.assert_allclose(single, batch[2 * i : 2 * i + 2].permute(0, 2, 3, 1).numpy(), atol=1 / 255 + 1e-6)
    # a fixed generator reproduces; a list of per-draw generators is accepted
    gen = [torch.Generator().manual_seed(k) for k in range(6)]
    a = vfm_pipe(y, "gaussian_blur", num_images_per_prompt=2, generator=gen, output_type="pt").images
    gen = [torch.Generator().manual_seed(k) for k in range(6)]
    b = vfm_pipe(y, "gaussian_blur", num_images_per_prompt=2, generator=gen, output_type="pt").images
    torch.testing.assert_close(a, b)


def test_vfm_masks_in_every_format_are_binarised_alike(vfm_pipe):
    y = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    mask = np.ones((16, 16), dtype=bool)
    mask[4:10, 3:9] = False
    forms = [
        torch.from_numpy(mask).float(),
        mask,
        mask.astype(np.uint8) * 255,
        Image.fromarray(mask.astype(np.uint8) * 255),
        torch.from_numpy(mask).float()[None, None].expand(2, 1, 16, 16),
    ]
    results = [vfm_pipe(y, "box_inpaint", mask=m, noise=_noise(2), output_type="pt").images for m in forms]
    for images in results[1:]:
        torch.testing.assert_close(images, results[0])
    op = vfm_pipe.operator_for("box_inpaint", 2, mask.astype(np.uint8) * 255)
    assert set(op.mask.unique().tolist()) == {0.0, 1.0} and op.mask.shape == (2, 1, 16, 16)


def test_vfm_accepts_a_user_operator_and_latents_bypass_the_adapter(vfm_pipe):
    y = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    by_name = vfm_pipe(y, "gaussian_blur", noise=_noise(2), output_type="pt").images
    operator = build_operator("gaussian_blur", (2, 3, 16, 16))
    by_operator = vfm_pipe(y, operator, noise=_noise(2), output_type="pt").images
    torch.testing.assert_close(by_operator, by_name)

    class Unknown(DegradationOperator):
        name = "my_blur"

    with pytest.raises(ValueError, match=r"unknown task 'my_blur'; this pipeline was trained for"):
        vfm_pipe(y, Unknown())
    z = _noise(2)
    out = vfm_pipe(latents=z, output_type="latent").images
    null = torch.full((2,), vfm_pipe.transformer.config.num_embeds_ada_norm)
    torch.testing.assert_close(out, one_step(FlowMapModel(vfm_pipe.transformer), z, null))


def test_vfm_callback_interrupt_and_num_timesteps(vfm_pipe):
    calls = []

    def callback(pipe, step, timestep, kwargs):
        calls.append((step, float(timestep)))
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == 2 else kwargs

    out = vfm_pipe(latents=_noise(1), num_inference_steps=3, callback_on_step_end=callback, output_type="latent")
    assert [c[0] for c in calls] == [0, 1, 2] and vfm_pipe.num_timesteps == 3
    assert not out.images.abs().sum()  # the callback's latents replaced the last step's

    def stop(pipe, step, timestep, kwargs):
        pipe._interrupt = True
        return kwargs

    calls.clear()
    vfm_pipe(latents=_noise(1), num_inference_steps=4, callback_on_step_end=lambda *a: (calls.append(1), stop(*a))[1])
    assert len(calls) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "super_resolution_2x", "observation": torch.rand(1, 3, 16, 16)}, r"observes \(3, 8, 8\)"),
        ({"task": "gaussian_blur", "observation": torch.rand(1, 16, 16, 3)}, r"channel-first"),
        ({"task": "denoise", "observation": torch.full((1, 3, 16, 16), float("nan"))}, "NaN"),
        ({"task": "denoise", "observation": torch.rand(1, 3, 16, 16) * 255}, r"observation_range"),
        ({"task": "denoise", "observation": torch.rand(1, 3, 16, 16) - 1}, r"span \["),
        ({"task": "denoise", "num_images_per_prompt": 0}, "num_images_per_prompt must be a positive integer"),
        ({"task": "denoise", "num_inference_steps": 0}, "num_inference_steps must be a positive integer"),
        ({"task": "denoise", "temperature": -1.0}, "temperature"),
        ({"task": "denoise", "generator": [torch.Generator()] * 3}, "3 generators for 1 draws"),
        ({"task": "denoise", "output_type": "jpeg"}, "output_type"),
        ({"task": "box_inpaint"}, "needs mask="),
        ({"task": "box_inpaint", "mask": torch.ones(8, 8)}, r"mask of shape \(1, 1, 8, 8\); expected \(H, W\)"),
        ({"task": "box_inpaint", "mask": torch.ones(3, 16, 16)}, "3 masks for 1 observations"),
        ({"task": "denoise", "mask": torch.ones(16, 16)}, "mask= belongs to the inpainting tasks"),
        ({"task": "motion_blur"}, "pass a DegradationOperator"),
        ({"task": "deblur"}, r"unknown task 'deblur'; this pipeline was trained for \['box_inpaint'"),
        ({"task": "denoise", "observation_range": (1, 0)}, "low < high"),
        ({"task": "denoise", "noise": torch.randn(2, 3, 16, 16)}, r"noise of shape \(2, 3, 16, 16\)"),
        ({"task": "denoise", "callback_on_step_end_tensor_inputs": ["x"]}, "callback_on_step_end_tensor_inputs"),
        ({"task": "denoise", "class_labels": [5]}, r"class_labels \[5\]"),
        ({"observation": None, "task": None}, "pass observation= and task="),
        ({"observation": "photo.png", "task": "denoise"}, "PIL images, numpy arrays or torch tensors, got str"),
        ({"latents": torch.randn(1, 3, 8, 8), "observation": None}, r"latents of shape \(1, 3, 8, 8\)"),
    ],
)
def test_vfm_bad_inputs_are_value_errors_that_name_the_expectation(vfm_pipe, kwargs, message):
    call = {"observation": torch.rand(1, 3, 16, 16), **kwargs}
    with pytest.raises(ValueError, match=message):
        vfm_pipe(**call)


def test_vfm_grayscale_and_rgba_pil_are_converted(vfm_pipe):
    rgb = Image.fromarray(_uint8_images(1, 16)[0])
    reference = vfm_pipe(rgb, "denoise", noise=_noise(1), output_type="pt").images
    rgba = vfm_pipe(rgb.convert("RGBA"), "denoise", noise=_noise(1), output_type="pt").images
    torch.testing.assert_close(rgba, reference)
    gray = vfm_pipe(rgb.convert("L"), "denoise", noise=_noise(1), output_type="pt").images
    assert gray.shape == (1, 3, 16, 16)


def test_noise_adapter_returns_a_base_output_or_a_tuple(vfm_pipe):
    adapter = vfm_pipe.noise_adapter
    y, task = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    out = adapter(y, task)
    assert isinstance(out, BaseOutput) and out.mean.shape == (2, 3, 16, 16)
    mean, logvar = adapter(y, task, return_dict=False)
    torch.testing.assert_close(mean, out.mean)
    torch.testing.assert_close(logvar, out.logvar)
    eps = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(out.sample(noise=eps, temperature=0.5), mean + 0.5 * torch.exp(0.5 * logvar) * eps)


def test_flow_map_from_a_plain_dit_folder_respects_torch_dtype(tmp_path):
    build_dit("test", 3, 16, 1, patch_size=4).save_pretrained(tmp_path / "dit")
    flow_map = FlowMapTransformer2DModel.from_pretrained(tmp_path / "dit", torch_dtype=torch.bfloat16)
    assert flow_map.dtype == torch.bfloat16
    flow_map.save_pretrained(tmp_path / "map")
    assert (
        FlowMapTransformer2DModel.from_pretrained(tmp_path / "map", torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    )


# ---- FlowMatchingPipeline -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def class_pipe():
    torch.manual_seed(0)
    pipe = FlowMatchingPipeline(build_dit("test", 1, 8, 10, patch_size=2).eval(), FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flow_matching_batch_equals_rows_and_callbacks_see_every_step(class_pipe):
    latents = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = class_pipe(
        class_labels=[1, 2],
        num_images_per_prompt=2,
        num_inference_steps=3,
        latents=latents,
        guidance_scale=2.0,
        output_type="pt",
    ).images
    for i, label in enumerate([1, 2]):
        rows = class_pipe(
            class_labels=label,
            num_images_per_prompt=2,
            num_inference_steps=3,
            latents=latents[2 * i : 2 * i + 2],
            guidance_scale=2.0,
            output_type="pt",
        ).images
        torch.testing.assert_close(rows, batch[2 * i : 2 * i + 2], atol=1e-5, rtol=1e-5)
    steps = []
    class_pipe(class_labels=1, num_inference_steps=3, callback_on_step_end=lambda p, i, t, k: (steps.append(i), k)[1])
    assert steps == [0, 1, 2] and class_pipe.num_timesteps == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_images_per_prompt": 0}, "num_images_per_prompt must be a positive integer"),
        ({"num_inference_steps": 0}, "num_inference_steps must be a positive integer"),
        ({"generator": [torch.Generator()] * 3}, "3 generators for 1 images"),
        ({"latents": torch.randn(2, 1, 8, 8)}, r"latents of shape \(2, 1, 8, 8\); expected \(1, 1, 8, 8\)"),
        ({"prompt": "a cat"}, "class-conditional: pass class_labels="),
    ],
)
def test_flow_matching_bad_inputs_are_value_errors(class_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        class_pipe(**{"class_labels": 3, "num_inference_steps": 1, **kwargs})


def test_prompt_embeds_equal_the_prompt_and_encode_prompt_needs_only_the_text_encoder():
    torch.manual_seed(0)
    encoder = OpenCLIPTextEncoder(model_cfg=tiny_clip_config()).eval()
    text_only = FlowMatchingPipeline(
        transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=encoder
    )
    embeds, pooled = text_only.encode_prompt(["a red circle", "a blue square"], num_images_per_prompt=2)
    assert embeds.shape == (4, 16, 64) and pooled.shape == (4, 64)
    torch.testing.assert_close(embeds[0], embeds[1])
    transformer = build_sd3("test", 1, 8, text_width=64, pooled_dim=64, patch_size=2).eval()
    pipe = FlowMatchingPipeline(transformer, FlowMatchEulerDiscreteScheduler(), text_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    common = {"num_inference_steps": 2, "guidance_scale": 2.0, "output_type": "pt", "num_images_per_prompt": 2}
    latents = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    by_prompt = pipe(prompt=["a red circle", "a blue square"], latents=latents, **common).images
    prompt_embeds, pooled_embeds = pipe.encode_prompt(["a red circle", "a blue square"])
    negative, negative_pooled = pipe.encode_prompt(["", ""])
    by_embeds = pipe(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_embeds,
        negative_prompt_embeds=negative,
        negative_pooled_prompt_embeds=negative_pooled,
        latents=latents,
        **common,
    ).images
    torch.testing.assert_close(by_embeds, by_prompt)
    with pytest.raises(ValueError, match="exactly one of prompt= and prompt_embeds="):
        pipe(prompt="a", prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_embeds)
    with pytest.raises(ValueError, match="needs pooled_prompt_embeds"):
        pipe(prompt_embeds=prompt_embeds)


def test_public_docstrings_carry_runnable_examples(tmp_path, monkeypatch):
    """diffusers-style ``Examples:`` in the pipelines, losses and trainers; those needing no trained folder run."""
    import doctest
    import re

    import diffusers_pafm as lib

    documented = [
        lib.FlowMatchingPipeline.__call__,
        lib.VariationalFlowMapPipeline.__call__,
        lib.PAFMLoss,
        lib.MeanFlowLoss,
        lib.VFMLoss,
        lib.PAFMTrainer,
        lib.MeanFlowTrainer,
        lib.VFMTrainer,
    ]
    for obj in documented:
        assert "Examples:" in obj.__doc__, obj.__qualname__
    monkeypatch.chdir(tmp_path)
    for obj in (lib.PAFMLoss, lib.MeanFlowLoss, lib.VFMLoss):
        source = re.sub(r"```\w*", "", obj.__doc__)
        test = doctest.DocTestParser().get_doctest(source, {}, obj.__qualname__, None, 0)
        assert test.examples, obj.__qualname__
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        runner.run(test)
        assert runner.failures == 0 and runner.tries == len(test.examples) >= 3, obj.__qualname__
