"""The GPU check script in its CPU form (``--device cpu --tiny``): the same code path as on a GPU, so it cannot rot."""

import json
import subprocess
import sys

from helpers import ROOT


def test_gpu_check_runs_on_cpu_and_its_device_checks_pass(tmp_path):
    output = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--device",
            "cpu",
            "--tiny",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    ratios = report["ratios"]
    assert set(ratios) >= {"pafm_over_fm", "pafm_knn_over_fm", "meanflow_over_fm", "vfm_speedup_over_dps"}
    assert all(value > 0 for value in ratios.values())
    assert set(report["goals"]) == {"pafm_over_fm", "knn_lookup_share", "meanflow_over_fm", "vfm_speedup_over_dps"}
    checks = report["correctness"]
    assert checks["posterior_velocity_rel_error"] <= 1e-5 and checks["jvp_vs_finite_difference_rel_error"] <= 1e-2
    assert checks["compiled_jvp_vs_jvp_rel_error"] <= 1e-4
    assert checks["pafm_run_losses_finite"] and checks["resume_max_loss_difference"] <= 1e-6 and checks["passed"]
    steps = report["absolute"]["step_seconds"]
    assert set(steps) == {
        "fm",
        "pafm",
        "pafm_class_bank",
        "pafm_knn",
        "meanflow",
        "meanflow_compiled_jvp",
        "vfm_joint",
    }
    assert ratios["meanflow_compiled_jvp_over_fm"] > 0
    assert "pafm_over_fm" in result.stdout  # the printed table
