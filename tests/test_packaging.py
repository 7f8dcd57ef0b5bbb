"""The package as a user installs it: a wheel installed non-editable into a fresh virtualenv renders its model
cards from package data and loads a saved pipeline, away from the source checkout."""

import json
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers import ROOT

from diffusers_pafm import FlowMatchingPipeline, build_dit


def test_wheel_installs_non_editable_renders_cards_and_loads_a_pipeline(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("diffusers_pafm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"diffusers_pafm/model_cards/pafm_model_card.md", "diffusers_pafm/model_cards/vfm_model_card.md"} <= set(
        names
    )
    assert not any(name.startswith(("tests/", "benchmarks/", "examples/")) for name in names)
    # a CUDA machine installs with plain `pip install -e ".[knn-gpu]"`: nothing in the metadata needs constraints.txt
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [
        line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines() if "Requires-Dist" in line
    ]
    assert any(line.startswith("Requires-Dist: torch>=") for line in requires), requires
    assert not any("==" in line.split(";")[0] or "+cpu" in line for line in requires), requires

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    (purelib,) = json.loads(
        subprocess.run(
            [str(python), "-c", "import json, site; print(json.dumps(site.getsitepackages()))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    # the dependencies (torch, diffusers, ...) come from the test environment; the package itself only from the wheel
    Path(purelib).mkdir(parents=True, exist_ok=True)
    deps = [p for p in site.getsitepackages() if "site-packages" in p]
    lines = (
        deps
        + [  # the dev-only torchvision shim, where the test environment has it (tools/torchvision_shim.py)
            "import _pafm_torchvision_shim" for d in deps[:1] if (Path(d) / "_pafm_torchvision_shim.py").is_file()
        ]
    )
    (Path(purelib) / "_test_deps.pth").write_text("\n".join(lines) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-c", str(ROOT / "constraints.txt")]
        + ["--target", purelib, str(wheel)],
        check=True,
        capture_output=True,
    )

    torch.manual_seed(0)
    pipe = FlowMatchingPipeline(build_dit("test", 1, 8, 10, patch_size=2), FlowMatchEulerDiscreteScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    script = textwrap.dedent(
        f"""
        import diffusers_pafm, torch
        from diffusers_pafm import FlowMatchingPipeline, render_model_card
        assert diffusers_pafm.__file__.startswith({str(venv)!r}), diffusers_pafm.__file__
        card = render_model_card(
            "vfm_model_card", license="apache-2.0", dataset="patches", model_name="m", repo_id="you/m", steps=1,
            tasks="box_inpaint", first_task="box_inpaint", sigma=0.05, training_config="{{}}", prior="kept",
        )
        assert "VariationalFlowMapPipeline.from_pretrained" in card
        pipe = FlowMatchingPipeline.from_pretrained({str(tmp_path / "pipe")!r})
        pipe.set_progress_bar_config(disable=True)
        images = pipe(class_labels=[3], num_inference_steps=2, output_type="np").images
        print("ok", images.shape)
        """
    )
    result = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok (1, 8, 8, 1)" in result.stdout
