"""Posterior MeanFlow: the PAFM posterior velocity inside the MeanFlow target, against closed forms."""

import math

import pytest
import torch
from torch import nn

from diffusers_pafm import (
    BatchCandidates,
    FlowBatch,
    FlowMapModel,
    FlowMapTransformer2DModel,
    MeanFlowLoss,
    Measurement,
    NoCondition,
    NoiseAdapterModel,
    PosteriorEstimator,
    SelfCandidates,
    TwoTimeSampler,
    VFMLoss,
    build_dit,
    make_posterior,
)


class Toy(nn.Module):
    """u(x_t, t, r): a small MLP (any dtype)."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim + 2, 32), nn.Tanh(), nn.Linear(32, dim))

    def forward(self, x_t, t, r, class_labels=None):
        return self.net(torch.cat([x_t, t[:, None].to(x_t.dtype), r[:, None].to(x_t.dtype)], 1))


def times(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = 0.3 + 0.6 * torch.rand(n, generator=g)
    r = t * torch.rand(n, generator=g)
    r[::3] = t[::3]  # some r = t rows
    return t, r


def test_own_endpoint_only_gives_exactly_the_plain_meanflow_target_and_loss():
    flow_map = FlowMapTransformer2DModel.from_flow_matching(build_dit("test", 1, 8, 1)).eval()
    u = FlowMapModel(flow_map)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    t, r = times(6)
    labels = torch.ones(6, dtype=torch.long)
    plain = MeanFlowLoss(adaptive_power=1.0)
    for form in ("mean", "sum"):
        posterior = MeanFlowLoss(adaptive_power=1.0, posterior=PosteriorEstimator(SelfCandidates()), form=form)
        a = plain(u, x, noise=noise, t=t, r=r, class_labels=labels)
        b = posterior(u, x, noise=noise, t=t, r=r, class_labels=labels, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)
        assert float(b.spread.abs().max()) < 1e-12 and float(b.ess.mean()) == 1.0  # rounding of (x_t - x) / t only


def test_every_data_point_as_candidate_gives_the_marginal_velocity_meanflow_target_fp64():
    """Closed form: v*(x_t, t) = E[eps - x | x_t] over the finite data set (Gaussian path likelihood in fp64 with
    torch.distributions), then u_tgt = v* - (t - r)(v* . grad_x u + d_t u) with a fp64 JVP of the same network."""
    dim, n = 3, 12
    g = torch.Generator().manual_seed(0)
    data = torch.randn(n, dim, generator=g)
    noise = torch.randn(n, dim, generator=g)
    t, r = times(n, seed=1)
    model = Toy(dim)
    loss = MeanFlowLoss(adaptive_power=0.0, posterior=PosteriorEstimator(BatchCandidates(), NoCondition()))
    x_t = (1 - t[:, None]) * data + t[:, None] * noise
    ours = loss.regression_target(model, FlowBatch(x=data), x_t, t, r, noise - data)

    d64, xt64, t64, r64 = data.double(), x_t.double(), t.double(), r.double()
    path = torch.distributions.Normal((1 - t64[:, None, None]) * d64[None], t64[:, None, None])
    weights = torch.softmax(path.log_prob(xt64[:, None, :]).sum(-1), dim=1)  # [B, N]
    marginal = (xt64 - weights @ d64) / t64[:, None]
    model64 = Toy(dim).double()
    _, dudt = torch.func.jvp(model64, (xt64, t64, r64), (marginal, torch.ones_like(t64), torch.zeros_like(r64)))
    reference = marginal - (t64 - r64)[:, None] * dudt
    torch.testing.assert_close(ours.velocity.double(), marginal, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.target.double(), reference, rtol=1e-4, atol=1e-5)
    assert (ours.ess > 1.0).any()  # the closed form is not trivially the own endpoint


def test_sum_and_mean_forms_have_identical_gradients_and_the_sum_adds_the_spread():
    dim, n = 4, 16
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    t, r = times(n, seed=2)
    grads, values = {}, {}
    for form in ("mean", "sum"):
        model = Toy(dim)
        loss = MeanFlowLoss(adaptive_power=0.0, posterior=PosteriorEstimator(BatchCandidates()), form=form)
        out = loss(model, x, noise=noise, t=t, r=r, generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        grads[form] = torch.cat([p.grad.flatten() for p in model.parameters()])
        values[form] = (out.loss.detach(), out.spread)
    torch.testing.assert_close(grads["sum"], grads["mean"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(values["sum"][0], values["mean"][0] + values["sum"][1].mean(), rtol=1e-5, atol=1e-6)
    assert values["sum"][1].min() >= 0 and values["sum"][1].max() > 0


def test_own_endpoint_rows_keep_the_conditional_velocity_and_the_others_get_the_posterior():
    dim, n = 3, 8
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    t, r = times(n, seed=3)
    estimator = PosteriorEstimator(BatchCandidates())
    loss = MeanFlowLoss(adaptive_power=0.0, posterior=estimator)
    x_t = (1 - t[:, None]) * x + t[:, None] * noise
    own = torch.tensor([True, False] * (n // 2))
    out = loss.regression_target(Toy(dim), FlowBatch(x=x), x_t, t, r, noise - x, own_endpoint=own)
    posterior = estimator.posterior_target(FlowBatch(x=x), x_t, t, noise - x).velocity
    torch.testing.assert_close(out.velocity[own], (noise - x)[own], rtol=0, atol=0)
    torch.testing.assert_close(out.velocity[~own], posterior[~own], rtol=0, atol=0)
    assert not torch.allclose(posterior[own], (noise - x)[own])  # the mask did something


def test_vfm_adapter_rows_keep_their_own_endpoint():
    """alpha = 1 (every MeanFlow row uses adapter noise): the posterior MeanFlow term equals the plain one; at
    alpha = 0 (fresh noise only) it differs."""
    flow_map = FlowMapTransformer2DModel.from_flow_matching(build_dit("test", 3, 16, 1, patch_size=4)).eval()
    u = FlowMapModel(flow_map)
    adapter = NoiseAdapterModel(sample_size=16, latent_size=16, num_tasks=1, block_out_channels=(8, 16))
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    task_ids = torch.zeros(4, dtype=torch.long)
    y = Measurement.simulate(x, task_ids, ["box_inpaint"], sigma=0.05, generator=torch.Generator().manual_seed(1))
    labels = torch.ones(4, dtype=torch.long)
    for alpha, same in ((1.0, True), (0.0, False)):
        outs = []
        for posterior in (None, PosteriorEstimator(BatchCandidates())):
            sampler = TwoTimeSampler(logit_mean=4.0, logit_std=0.1, r_neq_t=0.5)  # t near 1: weights spread
            meanflow = MeanFlowLoss(sampler, adaptive_power=0.0, posterior=posterior)
            vfm = VFMLoss(meanflow=meanflow, alpha=alpha)
            gen = torch.Generator().manual_seed(2)
            outs.append(vfm(u, adapter, x, y, y.pseudo_inverse(x), task_ids, labels, target_model=u, generator=gen))
        assert torch.equal(outs[1].meanflow, outs[0].meanflow) == same


def test_make_posterior_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown objective preset 'meanflow'"):
        make_posterior("meanflow")
    with pytest.raises(TypeError, match="posterior must be a PosteriorEstimator"):
        MeanFlowLoss(posterior=BatchCandidates())


def test_cli_trains_posterior_meanflow_resumes_exactly_and_feeds_the_vfm_stage(tmp_path):
    from helpers import ROOT, read_log, run

    from diffusers_pafm import MeanFlowTrainer, MeanFlowTrainingConfig, VariationalFlowMapPipeline

    script = str(ROOT / "training" / "train_vfm.py")
    args = ["--dataset", "digits", "--model_size", "test", "--train_batch_size", "16", "--report_to", "none"]
    args += ["--objective", "stablevm", "--bank_size", "8", "--loss_form", "sum", "--meanflow_r_neq_t", "0.5"]
    args += ["--validation_steps", "0", "--checkpointing_steps", "2", "--learning_rate", "1e-3"]
    args += ["--lr_scheduler", "constant"]  # resumed with a longer run: a cosine schedule would change
    straight = tmp_path / "straight"
    run([script, "--stage", "meanflow", *args, "--max_train_steps", "4", "--output_dir", str(straight)])
    log = read_log(straight)
    assert all(0 < r["self_weight"] <= 1 and r["ess"] >= 1 and r["spread"] >= 0 for r in log)
    assert max(r["ess"] for r in log) > 1  # the class bank filled and the posterior mixed

    def config(steps, out, **kw):
        keys = [a[2:] for a in args[::2]]
        values = dict(zip(keys, args[1::2]))
        numbers = {"train_batch_size", "bank_size", "checkpointing_steps", "validation_steps"}
        floats = {"meanflow_r_neq_t", "learning_rate"}
        typed = {k: int(v) if k in numbers else float(v) if k in floats else v for k, v in values.items()}
        return MeanFlowTrainingConfig(**typed, max_train_steps=steps, output_dir=str(out), **kw)

    resumed = tmp_path / "resumed"
    MeanFlowTrainer(config(2, resumed)).train()
    MeanFlowTrainer(config(4, resumed, resume_from_checkpoint="latest")).train()
    for a, b in zip(log[2:], read_log(resumed)[2:]):  # the class bank and its ring positions were checkpointed
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["ess"] - b["ess"]) <= 1e-6, (a, b)

    vfm = tmp_path / "vfm"
    vfm_args = ["--pretrained_model_name_or_path", str(straight), "--tasks", "box_inpaint", "--max_train_steps", "2"]
    vfm_args += ["--meanflow_derivative", "compiled_jvp"]  # the compiled JVP through the CLI and the joint stage
    run([script, "--stage", "vfm", *args, *vfm_args, "--output_dir", str(vfm)])
    assert [r["step"] for r in read_log(vfm)] == [1, 2] and all(math.isfinite(r["meanflow"]) for r in read_log(vfm))
    assert '"meanflow_derivative": "compiled_jvp"' in (vfm / "README.md").read_text()  # the card's training config
    pipe = VariationalFlowMapPipeline.from_pretrained(vfm)
    assert pipe.transformer.config.sample_size == 16
