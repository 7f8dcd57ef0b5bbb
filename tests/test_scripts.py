"""Command-line entry points run as a user would: the kNN bank builder and the demo."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

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
    """The demo's entry point end to end with a few steps of everything (`make demo` runs the full lengths)."""
    out = tmp_path / "demo"
    metrics = demo_main(["--output_dir", str(out), "--quick"])
    assert metrics["pafm"]["steps"] == 4 and metrics["pafm"]["mean_ess"] >= 1.0
    for task in ("box_inpaint", "random_inpaint", "super_resolution_2x"):
        assert set(metrics["vfm"][task]) == {
            "psnr_posterior_mean",
            "psnr_pseudo_inverse",
            "crps",
            "seconds_per_sample",
        }
        assert all(np.isfinite(v) for v in metrics["vfm"][task].values())
        with Image.open(out / f"vfm_{task}.png") as grid:  # 2 held-out rows of observation | 2 draws | mean | truth
            assert grid.size[0] > grid.size[1]
    for name in ("pafm_samples.png", "pafm_data.png", "metrics.json", "model_cards/pafm-digits.md"):
        assert (out / name).is_file(), name
    assert "VariationalFlowMapPipeline.from_pretrained" in (out / "model_cards" / "vfm-patches.md").read_text()
    assert json.loads((out / "metrics.json").read_text()) == metrics
    # every rendered card's usage snippet runs as written against the saved model (repo id -> the local folder)
    for card, folder in (("pafm-digits.md", "pafm-digits"), ("vfm-patches.md", "vfm-patches")):
        snippet = (out / "model_cards" / card).read_text().split("```python\n")[1].split("```")[0]
        local = snippet.replace('from_pretrained("' + folder + '")', f"from_pretrained(r'{out / 'runs' / folder}')")
        assert local != snippet, card
        namespace = {}
        exec(compile(local, card, "exec"), namespace)
        assert len(namespace["images"]) >= 1 and isinstance(namespace["images"][0], Image.Image)
    FlowMatchingPipeline.from_pretrained(out / "runs" / "pafm-digits")


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
