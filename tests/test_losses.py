"""PAFMLoss: K = 1 is FM exactly, sum/mean forms against a naive B x K x D reference, unbiasedness, presets."""

import math

import pytest
import torch

from diffusers_pafm import (
    BatchCandidates,
    ClassMatch,
    FlowBatch,
    PAFMLoss,
    SelfCandidates,
    VelocityModel,
    make_loss,
)
from diffusers_pafm.pafm import CandidateSet, CandidateSource


class FixedCandidates(CandidateSource):
    """A fixed shared pool with the batch's own endpoints at the front (test helper)."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, batch):
        endpoints = torch.cat([batch.x, self.pool])
        return CandidateSet(endpoints, torch.arange(batch.x.shape[0]))


class LinearField(torch.nn.Module):
    def __init__(self, dim, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(dim, dim, generator=g) * 0.1)
        self.b = torch.nn.Parameter(torch.randn(dim, generator=g) * 0.1)

    def forward(self, x_t, t, class_labels=None):
        return x_t @ self.w + self.b + t[:, None]


def test_k1_equals_plain_fm_exactly(tiny_dit):
    model = VelocityModel(tiny_dit)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    t, noise = torch.rand(6), torch.randn(6, 1, 8, 8)
    pred = model((1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise, t, class_labels=y)
    fm_reference = (pred - (noise - x)).pow(2).mean()
    for form in ("sum", "mean"):
        for loss_fn in (PAFMLoss(candidates=SelfCandidates(), form=form), make_loss("fm")):
            out = loss_fn(model, FlowBatch(x=x, class_labels=y), t=t, noise=noise)
            assert out.loss.item() == out.fm_loss.item()
            torch.testing.assert_close(out.loss, fm_reference, rtol=1e-6, atol=0)
            assert out.ess.eq(1).all() and out.self_weight.eq(1).all()


def naive_sum_form(pred, x_t, t, candidates, weights):
    """sum_j w_j ||pred - (x_t - z_j)/t||^2 with an explicit B x K x D tensor (per-dimension mean)."""
    v_j = (x_t[:, None] - candidates[None]) / t[:, None, None]
    per_candidate = (pred[:, None] - v_j).pow(2).mean(-1)  # [B, K]
    return (weights * per_candidate).sum(1).mean()


def test_sum_and_mean_forms_have_the_naive_gradients_and_values():
    g = torch.Generator().manual_seed(0)
    dim, b = 6, 16
    pool = torch.randn(40, dim, generator=g)
    x, t, noise = (
        torch.randn(b, dim, generator=g),
        torch.rand(b, generator=g) * 0.8 + 0.2,
        torch.randn(b, dim, generator=g),
    )
    grads, values = {}, {}
    for form in ("sum", "mean"):
        model = LinearField(dim)
        loss_fn = PAFMLoss(candidates=FixedCandidates(pool), form=form, temperature=2.0)
        out = loss_fn(model, FlowBatch(x=x), t=t, noise=noise)
        out.loss.backward()
        grads[form] = [p.grad.clone() for p in model.parameters()]
        values[form] = out.loss.item()

    model = LinearField(dim)
    x_t = (1 - t[:, None]) * x + t[:, None] * noise
    cands = torch.cat([x, pool])
    logits = -((x_t[:, None] - (1 - t[:, None, None]) * cands[None]) ** 2).sum(-1) / (2 * t[:, None] ** 2) / 2.0
    weights = torch.softmax(logits, 1)
    naive = naive_sum_form(model(x_t, t), x_t, t, cands, weights)
    naive.backward()
    for form in ("sum", "mean"):
        for ours, ref in zip(grads[form], [p.grad for p in model.parameters()]):
            assert (ours - ref).abs().max().item() <= 1e-6
    assert values["sum"] == pytest.approx(naive.item(), rel=1e-5)
    assert values["mean"] < values["sum"]  # differ by the theta-free spread


def test_sum_form_is_unbiased_for_the_fm_loss():
    """With every data point as a candidate (exact posterior, T = 1): E[L_sum - L_FM] = 0 (tower property)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(32, 3, generator=g) * 2
    model = LinearField(3, seed=1)
    loss_fn = PAFMLoss(candidates=FixedCandidates(data), form="sum")
    diffs = []
    for _ in range(40):
        idx = torch.randint(0, 32, (512,), generator=g)
        x = data[idx]
        t = torch.rand(512, generator=g) * 0.9 + 0.1
        noise = torch.randn(512, 3, generator=g)
        target = loss_fn.posterior_target(FlowBatch(x=x), (1 - t[:, None]) * x + t[:, None] * noise, t, noise - x)
        with torch.no_grad():
            pred = model((1 - t[:, None]) * x + t[:, None] * noise, t)
            sum_rows = (pred - target.velocity).pow(2).mean(1) + target.spread
            fm_rows = (pred - (noise - x)).pow(2).mean(1)
        diffs.append(sum_rows - fm_rows)
    d = torch.cat(diffs).double()
    se = d.std() / d.numel() ** 0.5
    assert abs(d.mean().item()) <= 3 * se.item(), (d.mean().item(), se.item())


def test_mean_form_is_biased_low_where_the_sum_form_is_not():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(32, 3, generator=g) * 2
    loss_fn = PAFMLoss(candidates=FixedCandidates(data))
    x = data[torch.randint(0, 32, (4096,), generator=g)]
    t = torch.full((4096,), 0.8)
    noise = torch.randn(4096, 3, generator=g)
    target = loss_fn.posterior_target(FlowBatch(x=x), (1 - t[:, None]) * x + t[:, None] * noise, t, noise - x)
    assert target.spread.mean() > 0.05  # the gap that only the sum form closes


def test_fm_mix_interpolates():
    g = torch.Generator().manual_seed(0)
    x, t, noise = torch.randn(8, 4, generator=g), torch.rand(8, generator=g), torch.randn(8, 4, generator=g)
    model = LinearField(4)
    outs = {
        lam: PAFMLoss(candidates=BatchCandidates(), fm_mix=lam, form="mean")(model, FlowBatch(x=x), t=t, noise=noise)
        for lam in (0.0, 0.3, 1.0)
    }
    expected = 0.3 * outs[1.0].loss + 0.7 * outs[0.0].loss
    torch.testing.assert_close(outs[0.3].loss, expected)
    torch.testing.assert_close(outs[1.0].loss, outs[1.0].fm_loss)


def test_class_dropout_uses_null_label_and_path_only_weights(tiny_dit):
    model = VelocityModel(tiny_dit)
    loss_fn = make_loss("pafm", num_classes=10, class_dropout=1.0)  # every row dropped
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8)
    batch = loss_fn.drop_conditions(FlowBatch(x=x, class_labels=y), loss_fn.draw_dropout(8))
    assert batch.class_labels.eq(10).all() and batch.null_mask.all()
    log_p = ClassMatch(null_class_id=10)(batch, BatchCandidates()(batch))
    assert log_p.eq(0).all()  # no class term for null rows
    out = loss_fn(model, FlowBatch(x=x, class_labels=y), generator=torch.Generator().manual_seed(0))
    assert out.effective_k.eq(8).all()
    assert torch.isfinite(out.loss)


def test_class_match_restricts_candidates(tiny_dit):
    model = VelocityModel(tiny_dit)
    x, y = torch.randn(8, 1, 8, 8), torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    out = make_loss("pafm", num_classes=10)(model, FlowBatch(x=x, class_labels=y), t=torch.ones(8))
    assert out.effective_k.tolist() == [3, 3, 3, 2, 2, 1, 2, 2]
    assert out.ess.tolist() == pytest.approx([3, 3, 3, 2, 2, 1, 2, 2], rel=1e-5)  # t = 1: uniform over matches


@pytest.mark.parametrize("t_value", [0.0, 1.0])
def test_loss_is_finite_at_the_ends(tiny_dit, t_value):
    model = VelocityModel(tiny_dit)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    out = make_loss("stf")(model, FlowBatch(x=x, class_labels=y), t=torch.full((8,), t_value))
    out.loss.backward()
    assert all(math.isfinite(v) for v in out.scalars().values())
    assert all(torch.isfinite(p.grad).all() for p in tiny_dit.parameters() if p.grad is not None)


def test_presets_and_errors():
    for preset in ("fm", "stf", "efm", "stablevm", "pafm"):
        make_loss(preset, num_classes=10, sample_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="unknown objective preset"):
        make_loss("ddpm")
    with pytest.raises(ValueError, match="needs a kNN bank"):
        make_loss("pafm", candidates="knn")
    with pytest.raises(FileNotFoundError, match="build_knn_index.py"):
        make_loss("pafm", candidates="knn", knn_bank="/nonexistent/bank")
    with pytest.raises(ValueError, match="unknown loss form"):
        PAFMLoss(form="median")
    with pytest.raises(ValueError, match="null_class_id"):
        PAFMLoss(class_dropout=0.1).drop_conditions(FlowBatch(torch.zeros(2, 1), torch.zeros(2)), torch.ones(2) > 0)
    with pytest.raises(ValueError, match="null_conditioning"):
        text = FlowBatch(torch.zeros(2, 1), conditioning={"pooled_projections": torch.zeros(2, 3)})
        PAFMLoss(class_dropout=0.1).drop_conditions(text, torch.ones(2) > 0)


def test_text_conditioned_sd3_through_the_same_adapter_and_clip_likelihood():
    """MMDiT (SD3Transformer2DModel) takes text embeddings by their diffusers names; CLIP weights flow through."""
    from diffusers import SD3Transformer2DModel

    from diffusers_pafm import CLIPLikelihood

    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        pos_embed_max_size=8,
    )
    model = VelocityModel(sd3)
    b = 4
    x, t, noise = torch.randn(b, 4, 8, 8), torch.rand(b) * 0.5 + 0.5, torch.randn(b, 4, 8, 8)
    text = torch.nn.functional.normalize(torch.randn(b, 8), dim=-1)
    batch = FlowBatch(x=x, text_embeds=text, image_embeds=text.clone())  # images perfectly aligned with captions
    conditioning = {"encoder_hidden_states": torch.randn(b, 5, 16), "pooled_projections": torch.randn(b, 12)}
    loss_fn = PAFMLoss(candidates=BatchCandidates(), likelihood=CLIPLikelihood(temperature=0.01))
    out = loss_fn(model, batch, t=t, noise=noise, **conditioning)
    out.loss.backward()
    assert all(p.grad is not None for p in sd3.parameters() if p.requires_grad)
    with torch.no_grad():
        direct = sd3(
            hidden_states=(1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise,
            timestep=t * 1000,
            return_dict=False,
            **conditioning,
        )[0]
        v = model((1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise, t, **conditioning)
    torch.testing.assert_close(v, direct)
    # cos = 1 with the own image vs < 1 with the others, at tau = 0.01: weight piles on the matching caption
    assert (out.self_weight > 0.5).all()
