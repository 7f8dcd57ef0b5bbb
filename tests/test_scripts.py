"""Command-line entry points run as a user would: the kNN bank builder and the demo."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from diffusers_pafm import FlowMatchingPipeline, KNNBank
from diffusers_pafm.demo import main as demo_main

ROOT = Path(__file__).resolve().parents[1]


def test_build_knn_index_script(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "latents.npy", rng.standard_normal((64, 2, 2, 2)).astype(np.float32))
    np.save(tmp_path / "labels.npy", rng.integers(0, 3, 64))
    cmd = [
        sys.executable,
        str(ROOT / "training/build_knn_index.py"),
        "--latents",
        str(tmp_path / "latents.npy"),
        "--labels",
        str(tmp_path / "labels.npy"),
        "--k",
        "4",
        "--output_dir",
        str(tmp_path / "bank"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["k"] == 4 and summary["num_samples"] == 64
    assert KNNBank(tmp_path / "bank").neighbors.shape == (64, 4)
    missing = subprocess.run(cmd[:3] + [str(tmp_path / "nope.npy")] + cmd[4:], capture_output=True, text=True)
    assert missing.returncode != 0 and "--latents file not found" in missing.stderr


def test_demo_writes_its_outputs_and_reloads(tmp_path):
    out = tmp_path / "demo"
    summary = demo_main(
        ["--output_dir", str(out), "--max_train_steps", "3", "--train_batch_size", "8", "--num_inference_steps", "2"]
    )
    assert summary["steps"] == 3
    lines = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert {"loss", "fm_loss", "ess", "self_weight", "seconds"} <= set(json.loads(lines[0]))
    for name in ("samples.png", "data.png", "summary.json", "pipeline/model_index.json"):
        assert (out / name).is_file(), name
    FlowMatchingPipeline.from_pretrained(out / "pipeline")


def test_readme_lists_the_public_api():
    import diffusers_pafm

    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- api-start -->")[1].split("<!-- api-end -->")[0]
    listed = {name.strip("`") for name in section.replace(",", " ").split() if name.startswith("`")}
    assert listed == set(diffusers_pafm.__all__)
    for name in diffusers_pafm.__all__:
        assert hasattr(diffusers_pafm, name), name


def test_readme_and_ci_use_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci/run").read_text()
