"""Command-line entry points run as a user would: the kNN bank builder and the demo."""

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import hub_server
import numpy as np
import pytest
from helpers import ACCELERATE
from PIL import Image

from diffusers_pafm import FlowMatchingPipeline, KNNBank, VariationalFlowMapPipeline

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


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The installed console script as a user runs it (``main`` behind it is the importable entry point)."""
    out = tmp_path_factory.mktemp("demo") / "demo_output"
    script = Path(sys.executable).parent / "diffusers-pafm-demo"
    result = subprocess.run([str(script), "--output_dir", str(out), "--quick"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]  # main returns the metrics; the script must still exit 0
    assert f"wrote {out}/: metrics.json" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    summary = result.stdout[result.stdout.rindex("\n{\n") : result.stdout.rindex("\n}\n") + 2]
    assert json.loads(summary) == metrics  # the printed summary is what metrics.json holds
    return out, metrics


def test_demo_writes_its_outputs_and_reloads(demo_run):
    """The demo's entry point end to end with a few steps of everything (`make demo` runs the full lengths)."""
    out, metrics = demo_run
    assert metrics["pafm"]["steps"] == 4 and metrics["pafm"]["mean_ess"] >= 1.0
    for task in ("box_inpaint", "random_inpaint", "super_resolution_2x"):
        assert set(metrics["vfm"][task]) == {
            "psnr_posterior_mean",
            "ssim_posterior_mean",
            "psnr_pseudo_inverse",
            "crps",
            "observation_residual_over_sigma",
            "spread_over_error",
            "coverage_50",
            "coverage_90",
            "mmd_draws_to_truths",
            "seconds_per_sample",
        }
        assert all(np.isfinite(v) for v in metrics["vfm"][task].values())
        with Image.open(out / f"vfm_{task}.png") as grid:  # 2 held-out rows of observation | 2 draws | mean | truth
            assert grid.size == (5 * 16 * 4, 2 * 16 * 4)
    for name in ("pafm_samples.png", "pafm_data.png", "metrics.json", "model_cards/pafm-digits.md"):
        assert (out / name).is_file(), name
    assert "VariationalFlowMapPipeline.from_pretrained" in (out / "model_cards" / "vfm-patches.md").read_text()
    # every rendered card's usage snippet runs as written against the saved model (repo id -> the local folder)
    for card, folder in (("pafm-digits.md", "pafm-digits"), ("vfm-patches.md", "vfm-patches")):
        snippet = (out / "model_cards" / card).read_text().split("```python\n")[1].split("```")[0]
        local = snippet.replace('from_pretrained("' + folder + '")', f"from_pretrained(r'{out / 'runs' / folder}')")
        assert local != snippet, card
        namespace = {}
        exec(compile(local, card, "exec"), namespace)
        assert len(namespace["images"]) >= 1 and isinstance(namespace["images"][0], Image.Image)
    FlowMatchingPipeline.from_pretrained(out / "runs" / "pafm-digits")
    # the demo's recipe reaches the export: x-prediction with raw t in the time embedders
    flow_map = VariationalFlowMapPipeline.from_pretrained(out / "runs" / "vfm-patches").transformer
    assert (flow_map.config.prediction_type, flow_map.config.time_embedding_scale) == ("sample", 1.0)
    card = (out / "model_cards" / "vfm-patches.md").read_text()
    # the joint stage's observation gradient reaches the map, its MeanFlow rows weighted plainly
    assert '"observation_trains_flow_map": true' in card and '"meanflow_adaptive_power": 0.0' in card
    # the prior before and after the joint stage, against held-out patches (two held-out sets: about 0)
    prior = metrics["vfm"]["prior"]["mmd_to_heldout"]
    assert set(prior) == {"heldout", "meanflow_map", "joint_map"}
    assert prior["heldout"] < 0.05 < min(prior["meanflow_map"], prior["joint_map"])  # 4 steps: far from the data
    with Image.open(out / "vfm_prior.png") as grid:  # rows: held-out patches, the MeanFlow map, the joint map
        assert grid.size[1] == 3 * 16 * 4 + 2 * 2


def test_readme_lists_the_public_api():
    import diffusers_pafm

    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- api-start -->")[1].split("<!-- api-end -->")[0]
    listed = {name.strip("`") for name in section.replace(",", " ").split() if name.startswith("`")}
    assert listed == set(diffusers_pafm.__all__)
    for name in diffusers_pafm.__all__:
        assert hasattr(diffusers_pafm, name), name


def test_readme_is_a_users_document_and_results_live_in_the_benchmarks_readme():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    benchmarks = (ROOT / "benchmarks" / "README.md").read_text()
    sections = benchmarks.split("\n## ")[1:]
    assert len(sections) >= 8
    for section in sections:  # each: a dated heading, the command that produced it, and its table
        heading = section.splitlines()[0]
        assert re.search(r"20\d\d-\d\d-\d\d", heading), heading
        assert "`python benchmarks/" in section or "`make demo`" in section, heading
        assert "|---|" in section, heading


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = path.relative_to(ROOT).with_suffix("").parts[: -node.level] if node.level else ()
            found.append(".".join([*base, node.module] if node.module else base) if node.level else node.module or "")
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def test_data_flows_one_way_and_user_scripts_use_the_public_api():
    """Nothing below the trainers imports them (the demo entry point may); examples/ and benchmarks/ import the
    top level or a sub-package's __all__, never a module inside a sub-package."""
    for path in (ROOT / "diffusers_pafm").rglob("*.py"):
        if "trainers" in path.parts or path.relative_to(ROOT).as_posix() in (
            "diffusers_pafm/demo.py",
            "diffusers_pafm/__init__.py",
        ):
            continue
        for module in _imports(path):
            assert not module.startswith("diffusers_pafm.trainers"), f"{path.relative_to(ROOT)} imports {module}"
    for folder in ("examples", "benchmarks"):
        for path in (ROOT / folder).glob("*.py"):
            for module in _imports(path):
                if module.startswith("diffusers_pafm."):
                    assert module.count(".") == 1, f"{path.relative_to(ROOT)} imports the module {module}"


def test_readme_and_ci_use_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci/run").read_text()


DOCUMENTED = (
    "README.md",
    "examples/README.md",
    "benchmarks/README.md",
    "docs/pafm.md",
    "docs/flow_maps_and_vfm.md",
    "docs/reward_tilted.md",
    "docs/training.md",
    "docs/real_scale.md",
    "docs/notes-2026-11.md",
)
NOT_RUN = {  # command prefix -> why the test below does not run it
    "accelerate launch --cpu --num_processes 2": "the documented trap (it runs ONE process)",
    "make demo": "the full-length demo; its entry point runs in --quick mode (demo_run)",
    "make test": "this test suite",
    "pip install": "installs packages",
    "python training/build_knn_index.py": "needs your latents.npy; test_build_knn_index_script runs it on random ones",
    "python training/precompute.py --dataset /data/cc12m": "needs CC12M shards and pretrained weights",
    "accelerate launch training/train_pafm.py --dataset cc12m-encoded": "needs the encoded CC12M folder",
    "accelerate launch training/train_pafm.py --dataset digits --objective pafm --max_train_steps 20": (
        "tests/test_trainer.py::test_acceptance_command_trains_20_steps_and_the_output_loads runs it as written"
    ),
    "accelerate launch training/train_vfm.py --stage meanflow": "20 000 steps; short runs are in tests/test_vfm.py",
    "accelerate launch training/train_vfm.py --stage vfm": "needs the flow map of the line above",
    "accelerate launch training/train_vfm.py --stage reward": "tests/test_reward_training.py runs it at toy size",
    "python training/train_vfm.py --stage meanflow --dataset digits --output_dir": "full-length (docs example)",
    "python training/train_vfm.py --stage reward": "tests/test_reward_training.py runs it at toy size",
    "python training/precompute.py --dataset shapes": "tests/test_reward_training.py runs it at toy size",
    "python training/train_vfm.py --stage meanflow --dataset shapes-encoded": "the same test runs it at toy size",
    "python benchmarks/checkerboard_vfm.py": "about 18 minutes; a short run is in tests/test_metrics.py",
    "python benchmarks/": "a benchmark (minutes)",
    "python -m diffusers_pafm.demo": "the demo_run fixture runs its entry point in --quick mode",
    "accelerate launch --config_file training/accelerate_configs/multi_gpu.yaml": "needs GPUs and real-scale data",
    "python training/precompute.py --dataset /data/imagenet": "needs ImageNet and pretrained weights",
    "python training/train_vfm.py --stage meanflow --dataset digits --objective": (
        "full-length training; tests/test_posterior_meanflow.py runs the same CLI at toy size"
    ),
}


def documented_commands() -> list[str]:
    """Every command of the user documents (README, examples, benchmarks, docs): ```bash blocks (continuations
    joined), then inline `python ...` / `accelerate launch ...` / `make ...` spans."""
    commands = []
    for doc in DOCUMENTED:
        text = (ROOT / doc).read_text()
        for block in text.split("```bash\n")[1:]:
            lines = block.split("```")[0].replace("\\\n", " ").splitlines()
            commands += [" ".join(line.split("#")[0].split()) for line in lines if line.split("#")[0].strip()]
        commands += re.findall(r"(?<!`)`((?:python|accelerate launch|make) [^`]+)`", text)
    return commands


def test_every_documented_command_is_run_or_has_a_reason():
    commands = documented_commands()
    assert len(commands) >= 10
    for prefix in NOT_RUN:  # a stale entry would hide nothing, but says the docs changed
        assert any(c.startswith(prefix) for c in commands), f"NOT_RUN entry {prefix!r} matches no documented command"


def test_documented_commands_run_as_written(demo_run, tmp_path):
    """The short commands of the README and examples/README.md, in order, each once, in a folder that has the demo's
    exports as demo_output/ (pushing goes to the local Hub-compatible server)."""
    out, _ = demo_run
    for name in ("examples", "training", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "demo_output").symlink_to(out)
    server, endpoint = hub_server.serve()
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_test_token", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    ran = []
    try:
        for command in documented_commands():
            if command in ran or any(command.startswith(prefix) for prefix in NOT_RUN):
                continue  # a command that two documents show runs once
            argv = shlex.split(command)
            argv[0] = {"python": sys.executable, "accelerate": ACCELERATE}[argv[0]]
            result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
            assert "hf_test_token" not in result.stdout + result.stderr
            ran.append(command)
    finally:
        server.shutdown()
    assert len(ran) >= 7, ran
    written_files = ("digits.png", "inpainted.png", "tilted.png", "lora.png", "vfm-eval/metrics.json")
    for written in (*written_files, "reward-tilted/reward_report.json"):
        assert (tmp_path / written).is_file(), written
    assert (tmp_path / "digits-lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "model_index.json" in hub_server.REPOS["you/vfm-patches"]["files"]
    scores = json.loads((tmp_path / "vfm-eval" / "metrics.json").read_text())
    assert set(scores["speed_ratio_dps_over_vfm"]) == {"box_inpaint", "random_inpaint", "super_resolution_2x"}


def test_benchmark_scripts_write_their_results(demo_run, tmp_path):
    """Both benchmarks at toy sizes (their real runs are documented in the README): JSON with the reported keys."""
    out, _ = demo_run
    bench = ROOT / "benchmarks"
    subprocess.run(
        [sys.executable, str(bench / "gradient_variance.py"), "--train_steps", "2", "--repeats", "3"]
        + ["--times", "0.5,0.9", "--output_dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    variance = json.loads((tmp_path / "gradient_variance_cpu.json").read_text())
    assert variance["t"] == [0.5, 0.9] and all(v > 0 for v in variance["variance_pafm"])
    # ESS of the exact same-class posterior of 16 x 16 digits (the reference values: ~2.5 and ~140)
    assert 1.5 < variance["ess_pafm"][0] < 4 and 80 < variance["ess_pafm"][1] < 200
    subprocess.run(
        [sys.executable, str(bench / "vfm_images.py"), "--pipeline", str(out / "runs" / "vfm-patches")]
        + ["--num_images", "2", "--num_draws", "2", "--dps_steps", "2", "--dps_scales", "0.1,1"]
        + ["--output_dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    images = json.loads((tmp_path / "vfm_images_cpu.json").read_text())
    assert set(images["tasks"]) == {"box_inpaint", "random_inpaint", "super_resolution_2x"}
    assert all(task["speed_ratio_dps_over_vfm"] > 0 for task in images["tasks"].values())
    assert (tmp_path / "vfm_images_cpu.png").is_file() and (tmp_path / "gradient_variance_cpu.png").is_file()


def test_stability_benchmark_runs_at_toy_size(tmp_path):
    """vfm_images.py --seeds: one five-task model per seed, and per task the paired gaps over the seeds."""
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vfm_images.py"), "--seeds", "0", "--meanflow_steps", "2"]
        + ["--vfm_steps", "2", "--num_images", "2", "--num_draws", "2", "--dps_steps", "2", "--dps_scales", "1"]
        + ["--output_dir", str(tmp_path), "--runs_dir", str(tmp_path / "runs")],
        check=True,
        capture_output=True,
    )
    result = json.loads((tmp_path / "vfm_stability_cpu.json").read_text())
    assert result["diverged"] == {} and len(result["tasks"]) == 5 and (tmp_path / "vfm_stability_cpu.png").is_file()
    box, run = result["tasks"]["box_inpaint"], result["runs"]["0"]["box_inpaint"]
    gap = run["vfm_one_step"]["psnr_posterior_mean"] - run["vfm_one_step"]["psnr_pseudo_inverse"]
    assert box["psnr_minus_pseudo_inverse"]["mean"] == pytest.approx(gap)
    assert box["beats_pseudo_inverse_psnr"] is False  # one seed: no standard error, so no claim
    (prior,) = result["priors"].values()
    assert prior["joint_over_meanflow"] == pytest.approx(prior["joint_map"] / prior["meanflow_map"])
    # the same models re-scored with DPS guiding the joint map instead of the MeanFlow map (the default)
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vfm_images.py"), "--seeds", "0", "--score_existing"]
        + ["--dps_map", "joint", "--num_images", "2", "--num_draws", "2", "--dps_steps", "2", "--dps_scales", "1"]
        + ["--output_dir", str(tmp_path / "joint"), "--runs_dir", str(tmp_path / "runs")],
        check=True,
        capture_output=True,
    )
    rescored = json.loads((tmp_path / "joint" / "vfm_stability_cpu.json").read_text())["runs"]["0"]["box_inpaint"]
    assert (run["dps_map"], rescored["dps_map"]) == ("meanflow", "joint")
    assert rescored["vfm_one_step"]["crps"] == run["vfm_one_step"]["crps"]  # same observations, noise and model
    assert rescored["dps"]["crps"] != run["dps"]["crps"]


def test_speed_benchmark_runs_at_toy_size(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vfm_speed.py"), "--sizes", "test:16", "--repeats", "1"]
        + ["--dps_steps", "2", "--num_images", "1", "--num_draws", "2", "--output_dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (result,) = json.loads((tmp_path / "vfm_speed_cpu.json").read_text())["sizes"].values()
    seconds = result["seconds_per_sample"]
    assert result["speed_ratio_dps_over_vfm"] == pytest.approx(seconds["dps"] / seconds["vfm_one_step"])


def test_quality_benchmarks_run_at_toy_size(tmp_path):
    bench = ROOT / "benchmarks"
    toy = ["--output_dir", str(tmp_path), "--runs_dir", str(tmp_path / "runs")]
    subprocess.run(
        [sys.executable, str(bench / "image_quality.py"), "--seeds", "0", "--steps", "2", "--samples_per_class", "8"]
        + ["--num_inference_steps", "2", "--feature_steps", "20", *toy],
        check=True,
        capture_output=True,
    )
    quality = json.loads((tmp_path / "image_quality_cpu.json").read_text())
    assert set(quality["methods"]) == {"fm", "pafm"} and 0 <= quality["feature_net_accuracy"] <= 1
    assert all(m["frechet_distance"]["mean"] > 0 for m in quality["methods"].values())
    subprocess.run(
        [sys.executable, str(bench / "text_quality.py"), "--seeds", "0", "--steps", "2", "--batch_size", "8"]
        + ["--num_train", "64", "--samples_per_prompt", "1", "--num_inference_steps", "2", "--clip_steps", "5"]
        + ["--feature_steps", "5", *toy],
        check=True,
        capture_output=True,
    )
    text = json.loads((tmp_path / "text_quality_cpu.json").read_text())
    assert set(text["methods"]) == {"fm", "pafm:caption", "pafm:clip"}
    for scores in text["methods"].values():
        assert scores["frechet_distance"]["mean"] > 0 and 0 <= scores["attribute_accuracy"]["mean"] <= 1
        assert set(scores) >= {"clip_score", "position_accuracy", "fd_reduction_vs_fm"}
    assert len(text["sheet_prompts"]) == 8 and (tmp_path / "text_quality_cpu.png").is_file()
    subprocess.run(
        [sys.executable, str(bench / "two_d_quality.py"), "--steps", "5", "--seeds", "0", "--num_data", "200"]
        + ["--num_samples", "200", "--knn_k", "4", "--output_dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    two_d = json.loads((tmp_path / "two_d_quality_cpu.json").read_text())
    assert (
        set(two_d["moons"]) == {"fm", "stf", "pafm"} and 0 <= two_d["checkerboard"]["fm"]["off_support"]["mean"] <= 1
    )


def test_reward_shapes_benchmark_runs_at_toy_size(tmp_path):
    """The text-context reward benchmark end to end: precompute, MeanFlow, reward stage, judged per caption."""
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "reward_shapes.py"), "--seeds", "0", "--meanflow_steps", "2"]
        + ["--reward_steps", "2", "--num_train", "64", "--num_samples", "1", "--clip_steps", "5"]
        + ["--feature_steps", "5", "--output_dir", str(tmp_path), "--runs_dir", str(tmp_path / "runs")],
        check=True,
        capture_output=True,
    )
    result = json.loads((tmp_path / "reward_shapes_cpu.json").read_text())
    (run,) = result["runs"]
    assert run["report"]["samples"] == 32 * 10 and 0 <= run["tilted_one_step"]["attribute_accuracy"] <= 1
    paired = result["summary"]["paired"]["clip_score_tilted_minus_base_one_step"]["mean"]
    assert paired == pytest.approx(run["tilted_one_step"]["clip_score"] - run["base_one_step"]["clip_score"])
    assert (tmp_path / "reward_shapes_cpu.png").is_file()


def test_reward_checkerboard_benchmark_runs_at_toy_size(tmp_path):
    """Its exact reference, every method and both pictures at a toy size (the real run is in benchmarks/README.md)."""
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "reward_checkerboard.py"), "--seeds", "0", "--meanflow_steps", "20"]
        + ["--tune_steps", "5", "--betas", "1", "--tradeoff_betas", "0.3,1", "--num_samples", "200"]
        + ["--guided_steps", "2", "--output_dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    result = json.loads((tmp_path / "reward_checkerboard_cpu.json").read_text())
    row = result["summary"]["1.0"]
    for method in ("untuned", "vfm", "vfm_reward_trains_map", "guided_100_steps"):
        assert row[f"{method}/mmd"]["mean"] >= 0 and 0 <= row[f"{method}/support"]["mean"] <= 1
    # the exact target: on the data's support, and a KL(p_beta || p) > 0 that shrinks as beta grows
    assert row["exact/support"]["mean"] == 1.0
    assert result["summary"]["0.3"]["exact/kl"]["mean"] > row["exact/kl"]["mean"] > 0
    assert (tmp_path / "reward_checkerboard_cpu.png").is_file()
    assert (tmp_path / "reward_checkerboard_tradeoff_cpu.png").is_file()


def test_gaussian_calibration_closed_form_rows_at_toy_size(tmp_path):
    """vfm_gaussian_calibration.py --closed_form_only: the protocol check and both diagonal-adapter ceilings, with the
    KL gaps (non-negative by Hadamard's inequality) reported per task."""
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vfm_gaussian_calibration.py"), "--closed_form_only"]
        + ["--num_fit", "512", "--resolution", "4", "--num_images", "4", "--num_draws", "8"]
        + ["--rotation_operators", "2", "--rotation_steps", "20", "--output_dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    result = json.loads((tmp_path / "vfm_gaussian_calibration_closed_form_cpu.json").read_text())
    assert set(result["tasks"]) == {
        "box_inpaint",
        "random_inpaint",
        "super_resolution_2x",
        "super_resolution_4x",
        "gaussian_blur",
    }
    for task, rows in result["tasks"].items():
        assert {"exact_posterior", "diagonal_adapter_meanflow_map", "diagonal_adapter_shared_rotation"} <= set(rows)
        assert rows["exact_posterior"]["psnr_exact_posterior_mean"] == pytest.approx(
            rows["diagonal_adapter_meanflow_map"]["psnr_exact_posterior_mean"]
        )
        gaps = result["shared_rotation_gap"][task]
        assert gaps["meanflow_map"] >= -1e-6 and gaps["shared_rotation"] >= -1e-6, task
    assert result["flow_map_prior_fit"] == {} and (tmp_path / "vfm_gaussian_calibration_closed_form_cpu.png").is_file()


def test_prior_drift_benchmark_runs_at_toy_size(tmp_path):
    """vfm_prior_drift.py (its defaults setting): the joint stage trains from a MeanFlow map and logs the drift at
    each validation, a new run in a used folder starts its log afresh."""
    argv = [sys.executable, str(ROOT / "benchmarks" / "vfm_prior_drift.py"), "--meanflow_steps", "2", "--steps", "2"]
    argv += ["--every", "1", "--num_train", "64", "--settings", "0"]
    argv += ["--output_dir", str(tmp_path), "--runs_dir", str(tmp_path / "runs")]
    stale = tmp_path / "runs" / "setting0" / "prior_drift.jsonl"  # an earlier run's log in the folder
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"step": 7, "prior_spread_ratio": 0.5}) + "\n")
    subprocess.run(argv, check=True, capture_output=True)
    result = json.loads((tmp_path / "vfm_prior_drift_cpu.json").read_text())
    assert list(result["settings"]) == ["defaults"]
    for setting in result["settings"].values():
        assert [d["step"] for d in setting["prior_drift"]] == [1, 2]
        assert all(d["prior_spread_ratio"] > 0 for d in setting["prior_drift"])
        assert len(setting["adapter_aggregate_eigenvalues"]["top5"]) == 5
    assert len(result["pull_on_the_prior"]) == 8 and (tmp_path / "vfm_prior_drift_cpu.png").is_file()
