"""A non-finite or spiking gradient never becomes a silent update or a damaged checkpoint (StepGuard)."""

import math

import pytest
import torch

from diffusers_pafm import PAFMTrainer, PAFMTrainingConfig
from diffusers_pafm.trainers.stability import StepGuard


class Faulty(PAFMTrainer):
    """PAFM on digits whose loss is multiplied by ``factor`` at step ``fault_step``."""

    fault_step, factor = 3, float("nan")

    def compute_loss(self, models, batch):
        loss, scalars = super().compute_loss(models, batch)
        if self.global_step + 1 == self.fault_step:
            loss = loss * self.factor
            scalars = {**scalars, "loss": scalars["loss"] * self.factor}
        return loss, scalars


def config(tmp_path, **kwargs):
    options = {"dataset": "digits", "model_size": "test", "train_batch_size": 8, "report_to": "none"}
    options.update(output_dir=str(tmp_path / "out"), checkpointing_steps=2, validation_steps=0)
    options.update(kwargs)
    return PAFMTrainingConfig(**options)


def test_injected_nan_stops_with_the_step_and_term_and_leaves_the_checkpoints_intact(tmp_path):
    with pytest.raises(FloatingPointError, match=r"step 3: the gradient norm is nan; non-finite loss terms: loss"):
        Faulty(config(tmp_path, max_train_steps=4)).train()
    out = tmp_path / "out"
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    result = PAFMTrainer(config(tmp_path, max_train_steps=4, resume_from_checkpoint="latest")).train()
    assert result.global_step == 4 and all(math.isfinite(v) for v in result.losses)


def test_injected_nan_is_skipped_and_counted_when_allowed(tmp_path):
    trainer = Faulty(config(tmp_path, max_train_steps=4, max_skipped_steps=1))
    result = trainer.train()
    log = list(result.losses)
    assert math.isnan(log[2]) and all(math.isfinite(v) for v in log[:2] + log[3:])
    weights = torch.cat([p.detach().flatten() for p in trainer.models["transformer"].parameters()])
    assert torch.isfinite(weights).all() and trainer.guard.skipped == 1


def test_injected_loss_spike_is_refused(tmp_path):
    spiking = type("Spiking", (Faulty,), {"fault_step": 13, "factor": 1e9})
    with pytest.raises(FloatingPointError, match=r"step 13: the gradient norm .*x the median .* of the last 12 steps"):
        spiking(config(tmp_path, max_train_steps=14, checkpointing_steps=100)).train()


def test_guard_alone_against_hand_computed_decisions():
    guard = StepGuard(max_skipped=1, spike_factor=10, warmup=3)
    assert all(guard.check(torch.tensor(v), i, {"loss": 1.0}) for i, v in enumerate([1.0, 2.0, 3.0], 1))
    assert guard.check(torch.tensor(19.9), 4, {"loss": 1.0})  # median 2 -> threshold 20
    assert not guard.check(torch.tensor(30.0), 5, {"loss": 1.0}) and guard.skipped == 1
    with pytest.raises(FloatingPointError, match="step 6: the gradient norm is inf; this process's loss terms are"):
        guard.check(torch.tensor(float("inf")), 6, {"loss": 1.0})
    state = guard.state_dict()
    restored = StepGuard(max_skipped=1, spike_factor=10, warmup=3)
    restored.load_state_dict(state)
    assert list(restored.norms) == list(guard.norms) and len(guard.norms) == 4 and restored.skipped == 2
    assert StepGuard(scaler_handles_nonfinite=True).check(float("nan"), 1, {})  # fp16: the GradScaler skips it
