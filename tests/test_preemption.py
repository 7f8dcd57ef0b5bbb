"""Preemption: SIGTERM finishes the step, writes a checkpoint atomically and exits 0, and the checkpoint resumes to
the losses of an uninterrupted run; incomplete checkpoint folders of a killed run are removed at the next start."""

import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, TRAIN, read_log, run

ARGS = ["--dataset", "digits", "--model_size", "test", "--train_batch_size", "16", "--report_to", "none"]
ARGS += ["--max_train_steps", "12", "--checkpointing_steps", "100", "--learning_rate", "1e-3"]


def test_sigterm_checkpoints_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path):
    straight = tmp_path / "straight"
    run([TRAIN, *ARGS, "--output_dir", str(straight)])

    stopped = tmp_path / "stopped"
    process = subprocess.Popen(
        [sys.executable, TRAIN, *ARGS, "--output_dir", str(stopped)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = stopped / "train_log.jsonl"
    deadline = time.time() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        if process.poll() is not None or time.time() > deadline:
            pytest.fail(f"the run ended before it could be interrupted: {process.communicate()[1][-2000:]}")
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    step = len(read_log(stopped))
    assert step < 12, "the signal came too late to test anything"
    assert f"stopped by SIGTERM after step {step}: checkpoint" in stdout + stderr
    assert (stopped / f"checkpoint-{step}").is_dir() and not (stopped / "model_index.json").exists()

    stale = stopped / f".checkpoint-{step + 1}.tmp-killed"  # what kill -9 during a checkpoint write leaves
    (stale / "transformer").mkdir(parents=True)
    run([TRAIN, *ARGS, "--output_dir", str(stopped), "--resume_from_checkpoint", "latest"])
    assert not stale.exists()
    assert [r["loss"] for r in read_log(stopped)] == pytest.approx([r["loss"] for r in read_log(straight)], abs=1e-6)
    assert (stopped / "model_index.json").is_file()


def test_resume_refuses_changes_it_cannot_honour_and_restarts_a_new_schedule_on_request(tmp_path):
    from diffusers_pafm import PAFMTrainer, PAFMTrainingConfig

    base = {"dataset": "digits", "model_size": "test", "train_batch_size": 16, "report_to": "none"}
    base.update(checkpointing_steps=2, lr_scheduler="cosine", learning_rate=1e-3, output_dir=str(tmp_path / "run"))
    PAFMTrainer(PAFMTrainingConfig(**base, max_train_steps=2)).train()

    def resume(**changes):
        config = PAFMTrainingConfig(**{**base, "max_train_steps": 4, **changes}, resume_from_checkpoint="latest")
        return PAFMTrainer(config).train()

    with pytest.raises(
        ValueError, match=r"another learning-rate schedule: --learning_rate: checkpoint 0.001, now 0.5"
    ):
        resume(learning_rate=0.5)
    with pytest.raises(ValueError, match="--max_train_steps: checkpoint 2, now 4"):  # cosine depends on the length
        resume()
    with pytest.raises(ValueError, match=r"cannot resume .* exactly: .*--train_batch_size: checkpoint 16, now 8"):
        resume(train_batch_size=8)
    with pytest.raises(ValueError, match="--objective: checkpoint 'pafm', now 'fm'"):
        resume(objective="fm")
    resume(learning_rate=0.5, allow_schedule_change=True)
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # cosine from 0.5 over 4 steps, restarted at step 2: the lr of step 3 is 0.5 * (1 + cos(pi * 2 / 4)) / 2
    assert rows[2]["lr"] == pytest.approx(0.25) and rows[0]["lr"] == pytest.approx(1e-3)
