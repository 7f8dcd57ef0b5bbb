"""VFM end to end: staged training through the script, exact resume, pipeline round trips (local and Hub),
one transformer call per one-step sample, and DDP gradient synchronisation with the JVP pass."""

import json
import os

import hub_server
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from helpers import ROOT, read_log, run, tiny_vae, two_process_launch

from diffusers_pafm import (
    ContextNoiseAdapterModel,
    FlowMapModel,
    FlowMapTransformer2DModel,
    Measurement,
    NoiseAdapterModel,
    RewardTerm,
    VariationalFlowMapPipeline,
    VFMLoss,
    build_dit,
    stop_gradient,
)
from diffusers_pafm.evaluation import prior_drift, unconditional_samples

TRAIN_VFM = str(ROOT / "training" / "train_vfm.py")
DATA = [
    "--dataset",
    "patches",
    "--max_train_samples",
    "128",
    "--resolution",
    "16",
    "--train_batch_size",
    "8",
    "--report_to",
    "none",
]


@pytest.fixture(scope="module")
def vfm_run(tmp_path_factory):
    """meanflow stage (from scratch), then joint VFM from it, 4 steps with a checkpoint at 2."""
    root = tmp_path_factory.mktemp("vfm")
    run(
        [
            TRAIN_VFM,
            *DATA,
            "--stage",
            "meanflow",
            "--model_size",
            "test",
            "--max_train_steps",
            "2",
            "--output_dir",
            str(root / "flowmap"),
        ]
    )
    common = [
        *DATA,
        "--stage",
        "vfm",
        "--pretrained_model_name_or_path",
        str(root / "flowmap"),
        "--tasks",
        "box_inpaint,super_resolution_2x,gaussian_blur",
        "--checkpointing_steps",
        "2",
        "--adapter_channels",
        "16,32",
        "--meanflow_adaptive_power",
        "1",
        "--lr_scheduler",  # the resume test below extends a 2-step run to 4: a schedule that does not depend on it
        "constant",
        "--lr_warmup_steps",  # and real updates from the first step
        "0",
    ]
    run([TRAIN_VFM, *common, "--max_train_steps", "4", "--validation_steps", "4", "--output_dir", str(root / "vfm")])
    return root, common


def test_staged_training_writes_a_loadable_pipeline_and_resumes_exactly(vfm_run):
    root, common = vfm_run
    assert (root / "flowmap" / "transformer" / "config.json").is_file()
    log = read_log(root / "vfm")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(np.isfinite(r[k]) for r in log for k in ("loss", "meanflow", "observation", "kl"))
    assert (root / "vfm" / "validation" / "step-4.png").is_file()
    card = (root / "vfm" / "README.md").read_text()
    assert "pipeline_tag: image-to-image" in card and "VariationalFlowMapPipeline.from_pretrained" in card
    # the prior drift, logged at validation and stated in the card, recomputed from the two saved maps
    (drift,) = [json.loads(line) for line in (root / "vfm" / "prior_drift.jsonl").read_text().splitlines()]
    start, trained = (  # the probe's noise: 256 draws of the run's seed (0, the default)
        unconditional_samples(FlowMapTransformer2DModel.from_pretrained(folder, subfolder="transformer"), 256, 0)
        for folder in (root / "flowmap", root / "vfm")
    )
    expected = prior_drift(start, trained)
    assert drift["step"] == 4 and drift["prior_spread_ratio"] == pytest.approx(
        expected["prior_spread_ratio"], rel=1e-4
    )
    assert drift["prior_mean_shift"] == pytest.approx(expected["prior_mean_shift"], rel=1e-3, abs=1e-6)
    assert f"have {expected['prior_spread_ratio']:.2f} x the spread of the starting map's" in card
    resumed = root / "resumed"
    run([TRAIN_VFM, *common, "--max_train_steps", "2", "--output_dir", str(resumed)])
    run(
        [
            TRAIN_VFM,
            *common,
            "--max_train_steps",
            "4",
            "--output_dir",
            str(resumed),
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    assert [r["loss"] for r in read_log(resumed)] == pytest.approx([r["loss"] for r in log], abs=1e-6)


def test_pipeline_round_trips_locally_and_through_the_hub_with_one_transformer_call(vfm_run, tmp_path):
    root, _ = vfm_run
    folder = root / "vfm"
    pipe = VariationalFlowMapPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
    low_res = torch.rand(2, 3, 8, 8)
    out = pipe(
        low_res,
        "super_resolution_2x",
        num_images_per_prompt=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (6, 16, 16, 3) and len(calls) == 1
    mask = torch.ones(1, 16, 16)
    mask[:, 4:10, 4:10] = 0
    inpainted = pipe(torch.rand(1, 3, 16, 16), "box_inpaint", mask=mask, output_type="np").images
    assert inpainted.shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="needs mask="):
        pipe(torch.rand(1, 3, 16, 16), "box_inpaint")
    with pytest.raises(ValueError, match="unknown task 'colorize'"):
        pipe(low_res, "colorize")

    server, endpoint = hub_server.serve()
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_local", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    script = tmp_path / "roundtrip.py"
    script.write_text(
        "import sys, numpy as np, torch\n"
        "from diffusers_pafm import VariationalFlowMapPipeline\n"
        "from diffusers_pafm.utils.hub import push_export\n"
        "push_export(sys.argv[1], 'user/vfm-tiny')\n"
        "def run(src):\n"
        "    pipe = VariationalFlowMapPipeline.from_pretrained(src)\n"
        "    pipe.set_progress_bar_config(disable=True)\n"
        "    y = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))\n"
        "    return pipe(y, 'super_resolution_2x', num_images_per_prompt=2, output_type='np',\n"
        "                generator=torch.Generator().manual_seed(0)).images\n"
        "hub, local = run('user/vfm-tiny'), run(sys.argv[1])\n"
        "assert np.array_equal(hub, local)\n"
        "print('identical')\n"
    )
    try:
        assert "identical" in run([str(script), str(folder)], env=env).stdout
        assert "noise_adapter/diffusion_pytorch_model.safetensors" in hub_server.REPOS["user/vfm-tiny"]["files"]
    finally:
        server.shutdown()


def _ddp_gradient_sync_worker():
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    flow_map = FlowMapTransformer2DModel.from_flow_matching(build_dit("test", 3, 8, 1))
    adapter = NoiseAdapterModel(
        in_channels=3,
        sample_size=8,
        latent_channels=3,
        latent_size=8,
        block_out_channels=[8],
        num_tasks=1,
        task_embed_dim=16,
    )
    context_adapter = ContextNoiseAdapterModel(latent_shape=(3, 8, 8), num_classes=2)
    ddp_map, ddp_adapter, ddp_context_adapter = acc.prepare(flow_map, adapter, context_adapter)
    gen = torch.Generator().manual_seed(100 + acc.process_index)  # different data on every rank
    # theta- of the data term: a stop-gradient copy, or the trained map itself (--observation_trains_flow_map, a
    # forward of the unwrapped module whose gradient must join the same all-reduce); the data term an observation,
    # or a reward with a class-context adapter (the reward stage; VFMLoss lets its gradient reach the map too)
    cases = [(stop_gradient(flow_map), "observation"), (FlowMapModel(flow_map), "observation")]
    cases += [(stop_gradient(flow_map), "reward"), (FlowMapModel(flow_map), "reward")]
    for target_model, kind in cases:
        for module in (flow_map, adapter, context_adapter):
            module.zero_grad(set_to_none=True)
        x = torch.randn(4, 3, 8, 8, generator=gen)
        labels = torch.randint(2, (4,), generator=gen)
        if kind == "observation":
            measurement = Measurement.simulate(x, torch.zeros(4, dtype=torch.long), ["random_inpaint"], 0.05, gen)
            data, adapter_in, used = measurement, measurement.pseudo_inverse(x), (ddp_adapter, adapter)
        else:
            data = RewardTerm(lambda images, c: -(images - c.view(-1, 1, 1, 1)).pow(2).mean((1, 2, 3)), labels, 0.5)
            adapter_in, used = labels, (ddp_context_adapter, context_adapter)
        out = VFMLoss(sigma=0.05)(
            FlowMapModel(ddp_map),
            used[0],
            x,
            data,
            adapter_in,
            task_ids=torch.zeros(4, dtype=torch.long),
            class_labels=labels,
            target_model=target_model,
            jvp_model=FlowMapModel(flow_map),
            generator=gen,
        )
        acc.backward(out.loss)
        grads = torch.cat(
            [p.grad.flatten() for p in [*flow_map.parameters(), *used[1].parameters()] if p.grad is not None]
        )
        everyone = acc.gather(grads.unsqueeze(0))
        local_losses = acc.gather(out.total.unsqueeze(0))  # before L / sg(L + c), which is ~1 everywhere
        assert local_losses[0] != local_losses[1], "ranks should see different data"
        torch.testing.assert_close(everyone[0], everyone[1], rtol=0, atol=0)
        assert grads.norm() > 0
    acc.wait_for_everyone()  # every rank is past its checks
    print("synchronised", flush=True)
    # Skip interpreter and gloo teardown: it raced between the ranks (one aborted with "terminate called without an
    # active exception", or hung after its work was done). The checks above are all this worker is for.
    os._exit(0)


def test_ddp_synchronises_gradients_with_the_split_jvp(tmp_path):
    # a real 2-process launch (forking pytest after torch has used its thread pool can deadlock the workers)
    script = tmp_path / "ddp_worker.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from test_vfm import _ddp_gradient_sync_worker\n_ddp_gradient_sync_worker()\n"
    )
    result = run(two_process_launch(str(script)), timeout=300)
    assert result.stdout.count("synchronised") == 2


def test_trainer_configs_are_composed_from_shared_parts():
    """One definition per option: the MeanFlow and VFM configs share the loop, data and flow-map parts, and the
    experiment levers measured not to help are not public options."""
    from dataclasses import fields

    from diffusers_pafm import DataConfig, MeanFlowTrainingConfig, TrainingConfig, VFMTrainingConfig
    from diffusers_pafm.trainers import FlowMapConfig, VFMConfig

    names = {c: {f.name for f in fields(c)} for c in (TrainingConfig, DataConfig, FlowMapConfig, VFMConfig)}
    meanflow, vfm = {f.name for f in fields(MeanFlowTrainingConfig)}, {f.name for f in fields(VFMTrainingConfig)}
    assert names[TrainingConfig] | names[DataConfig] | names[FlowMapConfig] <= meanflow & vfm
    assert names[VFMConfig] <= vfm and not names[VFMConfig] & meanflow
    removed = {"flow_map_lr_scale", "one_step_distillation_weight", "distillation_pairs", "stage", "mf_logit_mean"}
    assert not removed & (meanflow | vfm)
    assert all(name.startswith("meanflow_") for name in names[FlowMapConfig] if "logit" in name or "r_neq" in name)


def test_meanflow_trainer_keeps_a_pretrained_maps_parameterisation(vfm_run, tmp_path):
    """Options that shape a new flow map are refused for a pretrained map with a different value, and a new
    x-prediction map keeps its parameterisation in the exported config."""
    from diffusers_pafm import MeanFlowTrainer, MeanFlowTrainingConfig

    root, _ = vfm_run
    args = {"dataset": "patches", "max_train_samples": 128, "resolution": 16, "train_batch_size": 8}  # as DATA
    args.update(report_to="none", pretrained_model_name_or_path=str(root / "flowmap"))

    def train(name, **kwargs):
        config = MeanFlowTrainingConfig(**args, max_train_steps=1, output_dir=str(tmp_path / name), **kwargs)
        MeanFlowTrainer(config).train()

    start = FlowMapTransformer2DModel.from_pretrained(root / "flowmap", subfolder="transformer")
    assert start.config.prediction_type == "sample" and start.config.time_embedding_scale == 1.0  # the defaults
    with pytest.raises(ValueError, match="applies to a new flow map"):  # the starting map predicts x
        train("mismatch", prediction_type="velocity")
    with pytest.raises(ValueError, match="--time_embedding_scale 1000.0 applies to a new flow map"):  # it embeds t
        train("mismatch_time", time_embedding_scale=1000.0)
    train("kept")  # the defaults keep the pretrained map's own parameterisation
    args.pop("pretrained_model_name_or_path")
    train("velocity", prediction_type="velocity", time_embedding_scale=1000.0)  # diffusers' DiT convention
    exported = FlowMapTransformer2DModel.from_pretrained(tmp_path / "velocity", subfolder="transformer")
    assert exported.config.prediction_type == "velocity" and exported.config.time_embedding_scale == 1000.0


def test_observation_trains_flow_map_moves_the_map_with_the_same_objective(vfm_run, tmp_path):
    """--observation_trains_flow_map: one joint step logs the same loss terms (same seeds, same objective), and only
    the flow map's update differs (the observation gradient now reaches it; the exact gradient is checked against a
    hand-written observation term in test_vfm_linear_gaussian.py). It belongs to the joint stage."""
    from diffusers_pafm import VFMTrainer, VFMTrainingConfig

    root, _ = vfm_run
    args = {"dataset": "patches", "max_train_samples": 128, "resolution": 16, "train_batch_size": 8}  # as DATA
    args.update(report_to="none", pretrained_model_name_or_path=str(root / "flowmap"))
    args.update(tasks="box_inpaint,super_resolution_2x", adapter_channels="16,32", max_train_steps=1)
    args.update(lr_warmup_steps=0, learning_rate=1e-4)  # one full step; Adam amplifies 1e-7 gradient noise by lr

    def train(name, **kwargs):
        VFMTrainer(VFMTrainingConfig(**args, output_dir=str(tmp_path / name), **kwargs)).train()
        folder = tmp_path / name
        maps = FlowMapTransformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict()
        adapters = NoiseAdapterModel.from_pretrained(folder, subfolder="noise_adapter").state_dict()
        return read_log(folder)[0], maps, adapters

    plain_row, plain_map, plain_adapter = train("plain", observation_trains_flow_map=False)
    row, trained_map, adapter = train("learn", observation_trains_flow_map=True)
    for key in ("loss", "total", "meanflow", "observation", "kl"):
        assert row[key] == pytest.approx(plain_row[key], rel=1e-6), key
    for key in plain_adapter:  # the adapter's gradient does not depend on where theta- comes from
        torch.testing.assert_close(adapter[key], plain_adapter[key])
    moved = max(float((trained_map[k] - plain_map[k]).abs().max()) for k in plain_map)
    assert moved > 1e-6
    with pytest.raises(ValueError, match="cannot go with --adapter_only"):
        VFMTrainer(VFMTrainingConfig(**args, adapter_only=True, observation_trains_flow_map=True))


def test_latent_space_end_to_end_through_a_tiny_autoencoder(tmp_path):
    """meanflow + vfm stages on the latents of a tiny AutoencoderKL built here, the observation term in pixel space
    through its decoder; the export carries vae/, reloads with from_pretrained and samples pixel images in one step."""
    tiny_vae(tmp_path / "vae", sample_size=16)
    latent = ["--vae", str(tmp_path / "vae"), "--model_size", "test"]
    run(
        [
            TRAIN_VFM,
            *DATA,
            *latent,
            "--stage",
            "meanflow",
            "--max_train_steps",
            "2",
            "--output_dir",
            str(tmp_path / "fm"),
        ]
    )
    assert FlowMapTransformer2DModel.from_pretrained(tmp_path / "fm" / "transformer").config.in_channels == 4
    vfm_args = ["--stage", "vfm", "--pretrained_model_name_or_path", str(tmp_path / "fm"), "--tasks", "box_inpaint"]
    vfm_args += ["--adapter_channels", "8,16", "--max_train_steps", "2", "--output_dir", str(tmp_path / "vfm")]
    run([TRAIN_VFM, *DATA, *latent, *vfm_args])
    log = read_log(tmp_path / "vfm")
    assert all(np.isfinite(r["observation"]) and r["observation"] > 0 for r in log)

    pipe = VariationalFlowMapPipeline.from_pretrained(tmp_path / "vfm")
    assert pipe.vae is not None and pipe.noise_adapter.config.in_channels == 3
    assert pipe.noise_adapter.config.latent_channels == 4 and pipe.noise_adapter.config.latent_size == 8
    mask = torch.ones(2, 16, 16)
    mask[:, 4:12, 4:12] = 0
    observation = torch.rand(2, 3, 16, 16) * mask[:, None]
    images = pipe(observation, "box_inpaint", mask=mask, num_images_per_prompt=2, output_type="np").images
    assert images.shape == (4, 16, 16, 3) and np.isfinite(images).all()
    assert (images >= 0).all() and (images <= 1).all()
