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
    RewardTiltedFlowMapPipeline,
    RewardTrainer,
    RewardTrainingConfig,
    load_reward,
)
from diffusers_pafm.data.encoding import image_to_tensor
from diffusers_pafm.evaluation import train_feature_classifier

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
    run([TRAIN_VFM, *common, "--max_train_steps", "2", "--output_dir", str(exported), "--resume_from_checkpoint",
         str(out / "checkpoint-2")])  # fmt: skip
    again = load_file(exported / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(two_steps[k], again[k]) for k in two_steps) and (exported / "reward_report.json").is_file()
    past = run([TRAIN_VFM, *common, "--max_train_steps", "1", "--output_dir", str(root / "x"),
                "--resume_from_checkpoint", str(out / "checkpoint-2")], check=False)  # fmt: skip
    assert past.returncode != 0 and "past --max_train_steps 1: pass --max_train_steps 2" in past.stderr
    run([TRAIN_VFM, *common, "--max_train_steps", "4", "--output_dir", str(resumed), "--resume_from_checkpoint",
         "latest"])  # fmt: skip
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
