"""FlowMatchingPipeline round trip, DiT label dropout handling and the model adapter."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_pafm import FlowMatchingPipeline, VelocityModel
from diffusers_pafm.models import null_class_id


def test_dit_label_dropout_is_disabled_by_the_adapter(tiny_dit):
    tiny_dit.train()
    x, t, y = torch.randn(64, 1, 8, 8), torch.rand(64), torch.randint(0, 10, (64,))
    with torch.no_grad():
        a = tiny_dit(x, timestep=t * 1000, class_labels=y, return_dict=False)[0]
        b = tiny_dit(x, timestep=t * 1000, class_labels=y, return_dict=False)[0]
    assert not torch.equal(a, b)  # diffusers' DiT drops labels at random in train mode
    model = VelocityModel(tiny_dit)
    with torch.no_grad():
        assert torch.equal(model(x, t, class_labels=y), model(x, t, class_labels=y))
    assert null_class_id(tiny_dit) == 10


def test_velocity_model_scales_time_by_1000(tiny_dit):
    tiny_dit.eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([0.25, 0.75]), torch.tensor([1, 2])
    with torch.no_grad():
        direct = tiny_dit(x, timestep=torch.tensor([250.0, 750.0]), class_labels=y, return_dict=False)[0]
        torch.testing.assert_close(VelocityModel(tiny_dit)(x, t, class_labels=y), direct)


def test_pipeline_save_load_round_trip(tiny_dit, tmp_path):
    tiny_dit.eval()
    pipe = FlowMatchingPipeline(transformer=tiny_dit, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"class_labels": [1, 3], "num_images_per_prompt": 2, "num_inference_steps": 3, "guidance_scale": 2.0}
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="np").images
    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = FlowMatchingPipeline.from_pretrained(tmp_path / "pipe")
    reloaded.set_progress_bar_config(disable=True)
    after = reloaded(**kwargs, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert before.shape == (4, 8, 8, 1) and 0 <= before.min() and before.max() <= 1
    np.testing.assert_array_equal(before, after)
    pil = reloaded(class_labels=0, num_inference_steps=1).images
    assert len(pil) == 1 and pil[0].size == (8, 8)


def test_pipeline_one_euler_step_is_noise_minus_velocity(tiny_dit):
    tiny_dit.eval()
    pipe = FlowMatchingPipeline(transformer=tiny_dit, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 1, 8, 8)
    out = pipe(class_labels=[4], num_inference_steps=1, latents=noise.clone(), output_type="latent").images
    with torch.no_grad():
        v = VelocityModel(tiny_dit)(noise, torch.ones(1), class_labels=torch.tensor([4]))
    torch.testing.assert_close(out, noise - v)  # x_0 = x_1 - (1 - 0) v(x_1, t = 1)


def test_pipeline_rejects_bad_labels(tiny_dit):
    pipe = FlowMatchingPipeline(transformer=tiny_dit, scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match=r"class_labels \[10\]: one or more labels in \[0, 10\)"):
        pipe(class_labels=[10], num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[1], output_type="jpeg")


def test_class_labels_parse_once_and_refuse_what_they_would_misread(tiny_dit):
    from diffusers_pafm.utils import class_label_tensor

    assert class_label_tensor(3, 10).tolist() == [3]
    assert class_label_tensor([1, 2], 10).tolist() == [1, 2]
    assert class_label_tensor(torch.tensor([[4.0], [5.0]]), 10).tolist() == [4, 5]  # integral floats are labels
    assert class_label_tensor([10], 10, null_class=True).tolist() == [10]  # label num_classes: the null class
    assert class_label_tensor([], 10, allow_empty=True).numel() == 0
    assert class_label_tensor([12345], None).tolist() == [12345]  # no label table: only integral and >= 0
    with pytest.raises(ValueError, match=r"class_labels \[-1\]: one or more labels in \[0, inf\)"):
        class_label_tensor([-1], None)
    for bad, options, accepted in [
        ([2.7], {}, r"\[2\.70*\d*\]: labels are integers in \[0, 10\)"),
        ([10], {}, r"\[10\]: one or more labels in \[0, 10\)"),
        ([-1], {"null_class": True}, r"\[-1\]: one or more labels in \[0, 10\] \(10 = none\)"),
        ([], {}, r"\[\]: one or more labels"),
    ]:
        with pytest.raises(ValueError, match=r"class_labels " + accepted):
            class_label_tensor(bad, 10, **options)
    # the pipelines read labels through it: a fractional label is refused, never truncated to a class
    pipe = FlowMatchingPipeline(transformer=tiny_dit, scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="labels are integers"):
        pipe(class_labels=[1.5], num_inference_steps=1)
