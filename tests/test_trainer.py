"""PAFMTrainer end to end through the real scripts: acceptance runs, exact resume, kill -9, 1 vs 2 processes."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import ROOT, TRAIN, read_log, run, two_process_launch
from safetensors.torch import load_file

from diffusers_pafm import FlowMatchingPipeline
from diffusers_pafm.utils import load_state, resolve_checkpoint

SMALL = ["--dataset", "digits", "--model_size", "test", "--train_batch_size", "16", "--report_to", "none"]


def sample(folder, **kwargs):
    pipe = FlowMatchingPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs).images


def test_acceptance_command_trains_20_steps_and_the_output_loads(tmp_path):
    out = tmp_path / "OUT"
    args = [TRAIN, "--dataset", "digits", "--objective", "pafm", "--max_train_steps", "20", "--output_dir", str(out)]
    run(["accelerate", "launch", *args])
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 21))
    for key in ("loss", "fm_loss", "lr", "ess", "self_weight", "seconds"):
        assert all(np.isfinite(r[key]) for r in log), key
    assert all(r["ess"] >= 1 for r in log)
    assert log[-1]["loss"] < log[0]["loss"]
    images = sample(out, class_labels=[0, 7], num_images_per_prompt=2)
    assert images.shape == (4, 16, 16, 1) and np.isfinite(images).all()
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard scalars missing"
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "FlowMatchingPipeline.from_pretrained" in card


def test_resume_is_exact_and_kill_during_checkpoint_keeps_the_previous_one(tmp_path):
    common = SMALL + [
        "--objective",
        "stablevm",
        "--checkpointing_steps",
        "4",
        "--use_ema",
        "--ema_decay",
        "0.9",
        "--lr_scheduler",
        "constant_with_warmup",
        "--lr_warmup_steps",
        "3",
        "--gradient_accumulation_steps",
        "2",
        "--validation_steps",
        "4",
        "--validation_inference_steps",
        "2",
        "--report_to",
        "tensorboard",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run([TRAIN, *common, "--max_train_steps", "8", "--output_dir", str(straight)])
    run([TRAIN, *common, "--max_train_steps", "4", "--output_dir", str(resumed)])
    killed = tmp_path / "killed"
    shutil.copytree(resumed, killed)
    run([TRAIN, *common, "--max_train_steps", "8", "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])

    a, b = read_log(straight), read_log(resumed)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a[4:], b[4:]):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6 and abs(ra["ess"] - rb["ess"]) <= 1e-6
    # the exported weights are the EMA weights: identical after the interruption
    wa = load_file(straight / "transformer" / "diffusion_pytorch_model.safetensors")
    wb = load_file(resumed / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    state = load_state(straight / "checkpoint-8" / "training_state")
    assert state["global_step"] == 8 and state["ema"]["optimization_step"] == 8
    assert "bank.data" in "".join(state["extra"]["loss"])  # the StableVM memory bank travels with checkpoints
    assert (straight / "validation" / "step-8.png").is_file()

    # kill -9 in the middle of writing checkpoint-8: checkpoint-4 stays the latest and loads
    killer = tmp_path / "kill_in_checkpoint.py"
    killer.write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'training')!r})\n"
        "import diffusers_pafm.trainers.engine as engine\n"
        "original = engine.save_state\n"
        "def dying_save_state(state, path):\n"
        "    if state['global_step'] == 8:\n"
        "        original(state, path)\n"
        "        open(str(path) + '.safetensors', 'r+b').truncate(100)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    original(state, path)\n"
        "engine.save_state = dying_save_state\n"
        "import train_pafm\n"
        "train_pafm.main(sys.argv[1:])\n"
    )
    args = [*common, "--max_train_steps", "8", "--output_dir", str(killed), "--resume_from_checkpoint", "latest"]
    result = run([str(killer), *args], check=False)
    assert result.returncode == -9
    assert list(killed.glob(".checkpoint-8.tmp-*")), "the half-written checkpoint should be left in its temp folder"
    assert resolve_checkpoint(killed, "latest").name == "checkpoint-4"
    assert load_state(killed / "checkpoint-4" / "training_state")["global_step"] == 4
    run([TRAIN, *args])
    assert [r["loss"] for r in read_log(killed)[4:]] == pytest.approx([r["loss"] for r in a[4:]], abs=1e-6)


def test_two_processes_give_the_same_losses_as_one_with_the_same_global_batch(tmp_path):
    # 3 steps: a stop flag wrongly set after step 1 on one process would end the 2-process run at step 2
    args = SMALL[:-4] + ["--objective", "pafm", "--max_train_steps", "3", "--report_to", "none"]
    run([TRAIN, *args, "--train_batch_size", "16", "--output_dir", str(tmp_path / "one")])
    run(two_process_launch(TRAIN, *args, "--train_batch_size", "8", "--output_dir", str(tmp_path / "two")))
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(two) == 3 and len(one) == 3
    for key in ("loss", "fm_loss", "ess", "self_weight"):  # fp32 means over 16 rows, summed in another order
        assert one[0][key] == pytest.approx(two[0][key], rel=1e-6, abs=1e-6), key
    assert abs(one[1]["loss"] - two[1]["loss"]) <= 1e-5  # after one DDP-averaged step


def test_caption_as_class_weighs_only_same_caption_candidates(tmp_path):
    # one batch = the whole 32-sample set, no condition dropout: row i may only use the n(c_i) images of its caption
    from collections import Counter

    from diffusers_pafm.data import make_shapes

    out = tmp_path / "caption"
    args = ["--dataset", "shapes", "--max_train_samples", "32", "--model", "sd3", "--model_size", "test"]
    args += ["--condition_likelihood", "caption", "--class_dropout", "0", "--clip_train_steps", "5"]
    run(
        [
            TRAIN,
            *args,
            "--train_batch_size",
            "32",
            "--max_train_steps",
            "2",
            "--report_to",
            "none",
            "--output_dir",
            str(out),
        ]
    )
    counts = Counter(make_shapes(32, seed=0)[1]).values()
    assert max(counts) > 1  # the check below is not vacuous
    expected_k = sum(n * n for n in counts) / 32  # mean over rows of n(c_i)
    for record in read_log(out):
        assert abs(record["effective_k"] - expected_k) < 1e-6
        assert 1 <= record["ess"] <= expected_k + 1e-6
        assert record["spread"] > 0  # same-caption images differ, so the target is a real mixture


def test_text_conditioned_mmdit_with_the_clip_likelihood(tmp_path):
    out = tmp_path / "text"
    run(
        [
            TRAIN,
            "--dataset",
            "shapes",
            "--max_train_samples",
            "256",
            "--model",
            "sd3",
            "--model_size",
            "test",
            "--condition_likelihood",
            "clip",
            "--clip_train_steps",
            "30",
            "--train_batch_size",
            "16",
            "--max_train_steps",
            "3",
            "--validation_steps",
            "3",
            "--validation_inference_steps",
            "2",
            "--output_dir",
            str(out),
        ]
    )
    log = read_log(out)
    assert len(log) == 3 and all(1 <= r["ess"] <= 16 for r in log)
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == ["diffusers_pafm.models.text_encoder", "OpenCLIPTextEncoder"]
    images = sample(out, prompt=["a small red circle at the top left"], num_images_per_prompt=2, guidance_scale=2.0)
    assert images.shape == (2, 32, 32, 3)
    assert (out / "validation" / "step-3.png").is_file()
    assert "pipeline_tag: text-to-image" in (out / "README.md").read_text()


def test_image_grid_places_scaled_tiles_with_white_gaps():
    from PIL import Image

    from diffusers_pafm.utils import image_grid

    tiles = [Image.new("RGB", (2, 3), (10 * i, 0, 0)) for i in range(6)]
    grid = image_grid(tiles, rows=2, cols=3, scale=2, gap=1)
    assert grid.size == (3 * 4 + 2, 2 * 6 + 1)
    assert grid.getpixel((4, 0)) == (255, 255, 255) and grid.getpixel((0, 6)) == (255, 255, 255)  # the gaps
    assert grid.getpixel((5, 0)) == (10, 0, 0) and grid.getpixel((13, 12)) == (
        50,
        0,
        0,
    )  # tile 1, last pixel of tile 5
    assert image_grid(tiles, rows=2, cols=3).size == (6, 6)  # no gap, no scale: tiles side by side
