"""Reward stage end to end through the script: train, exact resume, export, reload, one-step sampling, the report
and model card; a user reward as module:function; bad reward specs are clear errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import ROOT, read_log, run, two_process_launch
from safetensors.torch import load_file

from diffusers_pafm import (
    ClassifierReward,
    CLIPReward,
    RewardTiltedFlowMapPipeline,
    RewardTrainer,
    RewardTrainingConfig,
    load_reward,
)
from diffusers_pafm.data import EncodedDataset
from diffusers_pafm.data.encoding import image_to_tensor
from diffusers_pafm.evaluation import train_feature_classifier
from diffusers_pafm.models.clip import load_clip

TRAIN_VFM = str(ROOT / "training" / "train_vfm.py")
DATA = ["--dataset", "digits", "--max_train_samples", "128", "--train_batch_size", "8", "--report_to", "none"]


def digit_classifier(folder):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (digits.images / 16.0 * 255).round().astype(np.uint8)
    images = torch.stack([image_to_tensor(Image.fromarray(g, mode="L"), 16, 1) for g in grey[:400]])
    net, _ = train_feature_classifier(images, torch.as_tensor(digits.target[:400]), steps=30)
    net.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    run([TRAIN_VFM, *DATA, "--stage", "meanflow", "--model_size", "test", "--max_train_steps", "2",
         "--output_dir", str(root / "flowmap")])  # fmt: skip
    classifier = digit_classifier(root / "classifier")
    common = [
        *DATA,
        "--stage",
        "reward",
        "--pretrained_model_name_or_path",
        str(root / "flowmap"),
        "--reward",
        f"classifier:{classifier}",
        "--beta",
        "0.5",
        "--checkpointing_steps",
        "2",
        "--report_samples",
        "4",
        "--lr_scheduler",  # the resume check extends a 2-step run to 4: a schedule that does not depend on it
        "constant",
        "--lr_warmup_steps",
        "0",
    ]
    run([TRAIN_VFM, *common, "--max_train_steps", "4", "--validation_steps", "4", "--output_dir", str(root / "out")])
    return root, common


def test_reward_stage_trains_resumes_exactly_and_exports_a_one_step_pipeline(reward_run):
    root, common = reward_run
    out = root / "out"
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(np.isfinite(r[k]) for r in log for k in ("loss", "meanflow", "reward", "kl"))
    assert all(r["reward"] <= 0 for r in log)  # a log-probability
    assert (out / "validation" / "step-4.png").is_file()
    resumed = root / "resumed"
    run([TRAIN_VFM, *common, "--max_train_steps", "2", "--output_dir", str(resumed)])
    two_steps = load_file(resumed / "transformer" / "diffusion_pytorch_model.safetensors")
    # a checkpoint exports as it is when resumed at its own step: the 4-step run's checkpoint-2 is the 2-step run
    exported = root / "exported-2"
    export_run = run([TRAIN_VFM, *common, "--max_train_steps", "2", "--output_dir", str(exported),
                      "--resume_from_checkpoint", str(out / "checkpoint-2")])  # fmt: skip
    assert f"no step to train (at step 2): exported as it is to {exported}" in export_run.stdout
    again = load_file(exported / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(two_steps[k], again[k]) for k in two_steps) and (exported / "reward_report.json").is_file()
    past = run([TRAIN_VFM, *common, "--max_train_steps", "1", "--output_dir", str(root / "x"),
                "--resume_from_checkpoint", str(out / "checkpoint-2")], check=False)  # fmt: skip
    assert past.returncode != 0 and "past --max_train_steps 1: pass --max_train_steps 2" in past.stderr
    resumed_run = run([TRAIN_VFM, *common, "--max_train_steps", "4", "--output_dir", str(resumed),
                       "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert f"trained steps 3-4; pipeline saved to {resumed}" in resumed_run.stdout
    assert [r["loss"] for r in read_log(resumed)] == pytest.approx([r["loss"] for r in log], abs=1e-6)

    pipe = RewardTiltedFlowMapPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([3, 7], num_images_per_prompt=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert images.images.shape == (4, 1, 16, 16)
    again = pipe([3, 7], num_images_per_prompt=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images.images, again.images)
    assert len(pipe(3, output_type="pil").images) == 1
    with pytest.raises(ValueError, match=r"class_labels \[10\]: one or more labels in \[0, 10\)"):
        pipe(10)

    report = json.loads((out / "reward_report.json").read_text())
    assert report["samples"] == 40 and np.isfinite(report["reward_gain"]) and report["prior_drift_mmd"] >= 0
    # the report's reward of the tilted draws, recomputed from the exported pipeline and the reward itself
    reward = ClassifierReward.from_pretrained(root / "classifier")
    labels = torch.arange(10).repeat_interleave(4)
    noise = torch.randn((40, 1, 16, 16), generator=torch.Generator().manual_seed(0 + 1))  # the report's: seed + 1
    draws = pipe(list(range(10)), num_images_per_prompt=4, noise=noise, output_type="latent").images
    with torch.no_grad():
        assert float(reward(draws, labels).mean()) == pytest.approx(report["reward_one_step"], abs=1e-4)
    card = (out / "README.md").read_text()
    assert f"classifier:{root / 'classifier'}" in card and "beta = 0.5" in card and '"reward_gain"' in card


def test_a_user_reward_by_module_and_function(reward_run, tmp_path):
    root, _ = reward_run
    (tmp_path / "my_rewards.py").write_text("def brightness(images, context):\n    return images.mean((1, 2, 3))\n")
    out = tmp_path / "out"
    run(
        [TRAIN_VFM, *DATA, "--stage", "reward", "--pretrained_model_name_or_path", str(root / "flowmap"),
         "--reward", "my_rewards:brightness", "--max_train_steps", "2", "--report_samples", "2",
         "--output_dir", str(out)],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    report = json.loads((out / "reward_report.json").read_text())
    assert -1 <= report["reward_one_step"] <= 1  # mean brightness of images in [-1, 1]


def darkness(images, class_labels):
    return -images.mean((1, 2, 3))


def test_a_python_callable_reward(reward_run, tmp_path):
    """RewardTrainer(config, reward=fn): the callable is the reward (the report's reward is recomputed with it) and
    its module:function name goes into the config and the model card; the reward given twice, or not callable, is
    an error naming both."""
    root, _ = reward_run
    kwargs = {"dataset": "digits", "max_train_samples": 128, "train_batch_size": 8, "report_to": "none"}
    kwargs.update(pretrained_model_name_or_path=str(root / "flowmap"), max_train_steps=2, report_samples=2)
    config = RewardTrainingConfig(**kwargs, output_dir=str(tmp_path / "out"))
    export = RewardTrainer(config, reward=darkness).train().export_dir
    assert (
        config.reward == "test_reward_training:darkness"
        and "test_reward_training:darkness" in (export / "README.md").read_text()
    )
    report = json.loads((export / "reward_report.json").read_text())
    pipe = RewardTiltedFlowMapPipeline.from_pretrained(export)
    noise = torch.randn((20, 1, 16, 16), generator=torch.Generator().manual_seed(0 + 1))  # the report's: seed + 1
    draws = pipe(list(range(10)), num_images_per_prompt=2, noise=noise, output_type="latent").images
    assert float(darkness(draws, None).mean()) == pytest.approx(report["reward_one_step"], abs=1e-5)
    with pytest.raises(ValueError, match="give the reward once"):
        RewardTrainer(RewardTrainingConfig(**kwargs, reward="classifier:x"), reward=darkness)
    with pytest.raises(TypeError, match="must be a callable"):
        RewardTrainer(RewardTrainingConfig(**kwargs), reward="classifier:x")


def test_reward_stage_on_two_processes_resumes_exactly(reward_run, tmp_path):
    """Real 2-process DDP (accelerate launch): 4 steps straight, and the same run resumed from its step-2 checkpoint
    reproduces steps 3-4 (both ranks' generators are in the checkpoint); the main process's export loads."""
    root, common = reward_run
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [*common, "--max_train_steps", "4", "--train_batch_size", "4"]
    run(two_process_launch(TRAIN_VFM, *args, "--output_dir", str(straight)), timeout=400)
    log = read_log(straight)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copyfile(straight / "train_log.jsonl", resumed / "train_log.jsonl")
    run(two_process_launch(TRAIN_VFM, *args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"),
        timeout=400)  # fmt: skip
    assert [r["loss"] for r in read_log(resumed)] == pytest.approx([r["loss"] for r in log], abs=1e-6)
    images = RewardTiltedFlowMapPipeline.from_pretrained(resumed)([1, 2], output_type="pt").images
    assert images.shape == (2, 1, 16, 16)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nonsense", "is not one of classifier:<folder>"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("json:no_such_function", "module 'json' has no callable 'no_such_function'"),
        ("clip_head:tiny", "write clip_head:<clip name-or-folder>,<weights.safetensors>"),
    ],
)
def test_bad_reward_specs_are_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        load_reward(spec)


def test_reward_stage_needs_a_reward_and_labelled_data(reward_run, tmp_path):
    root, _ = reward_run
    result = run([TRAIN_VFM, *DATA, "--stage", "reward", "--pretrained_model_name_or_path", str(root / "flowmap"),
                  "--output_dir", str(tmp_path / "x")], check=False)  # fmt: skip
    assert result.returncode != 0 and "--reward" in result.stderr


def test_text_context_reward_stage_samples_from_a_prompt(tmp_path):
    """--reward_context text on captioned shapes: the adapter is conditioned on the caption's CLIP text embedding and
    the reward (tiny-CLIP similarity) on the caption. The export carries the text encoder: its normalised embedding of
    a caption is the data's clip_text (1e-5), prompt and prompt_embeds give the same draws, and the report's reward is
    CLIPReward recomputed on the pipeline's draws for the captions."""
    enc, flowmap, out = tmp_path / "shapes", tmp_path / "flowmap", tmp_path / "out"
    run([str(ROOT / "training" / "precompute.py"), "--dataset", "shapes", "--max_train_samples", "64",
         "--resolution", "16", "--clip_train_steps", "20", "--no_text_encoder", "--output_dir", str(enc)])  # fmt: skip
    data_args = ["--dataset", str(enc), "--train_batch_size", "8", "--report_to", "none", "--max_train_steps", "2"]
    run([TRAIN_VFM, *data_args, "--stage", "meanflow", "--model_size", "test", "--output_dir", str(flowmap)])
    run([TRAIN_VFM, *data_args, "--stage", "reward", "--reward_context", "text", "--reward", f"clip:{enc / 'clip'}",
         "--pretrained_model_name_or_path", str(flowmap), "--report_samples", "2", "--validation_steps", "2",
         "--output_dir", str(out)])  # fmt: skip
    assert all(-1 <= r["reward"] <= 1 for r in read_log(out))  # a cosine similarity
    assert (out / "validation" / "step-2.png").is_file() and "a large red circle" in (out / "README.md").read_text()

    pipe = RewardTiltedFlowMapPipeline.from_pretrained(out)
    data = EncodedDataset.load(enc)
    assert pipe.conditions_on_text and pipe.text_encoder is not None
    embeds = pipe.encode_prompt(data.captions[3])
    torch.testing.assert_close(embeds[0], torch.as_tensor(np.array(data.arrays["clip_text"][3])), atol=1e-5, rtol=0)
    noise = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(5))
    by_prompt = pipe(prompt=data.captions[3], num_images_per_prompt=2, noise=noise, output_type="latent").images
    by_embeds = pipe(prompt_embeds=embeds, num_images_per_prompt=2, noise=noise, output_type="latent").images
    torch.testing.assert_close(by_prompt, by_embeds)
    assert pipe(prompt=["a small blue square", "a large red circle"], output_type="pt").images.shape == (2, 3, 16, 16)

    report = json.loads((out / "reward_report.json").read_text())
    prompts = list(dict.fromkeys(data.captions))[:10]
    noise = torch.randn((2 * len(prompts), 3, 16, 16), generator=torch.Generator().manual_seed(0 + 1))
    draws = pipe(prompt=prompts, num_images_per_prompt=2, noise=noise, output_type="latent").images
    reward = CLIPReward(load_clip(str(enc / "clip")))(draws, [p for p in prompts for _ in range(2)])
    assert report["samples"] == 2 * len(prompts)
    assert float(reward.mean()) == pytest.approx(report["reward_one_step"], abs=1e-5)

    with pytest.raises(ValueError, match="conditioned on text: pass prompt or prompt_embeds"):
        pipe(class_labels=[0])
    with pytest.raises(ValueError, match=r"prompt_embeds of shape \(1, 3\)"):
        pipe(prompt_embeds=torch.zeros(1, 3))


def test_text_context_needs_captioned_data(reward_run, tmp_path):
    root, _ = reward_run
    config = RewardTrainingConfig(
        dataset="digits", max_train_samples=64, report_to="none", reward="classifier:x", reward_context="text",
        pretrained_model_name_or_path=str(root / "flowmap"), output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="--reward_context text needs captioned data with CLIP text embeddings"):
        RewardTrainer(config).train()
    with pytest.raises(ValueError, match="reward_context"):
        RewardTrainingConfig(reward="classifier:x", reward_context="prompt").validate()
    images = RewardTiltedFlowMapPipeline.from_pretrained(root / "out")
    with pytest.raises(ValueError, match="conditioned on class labels: pass class_labels"):
        images(prompt="a digit")
