"""LoRA fine-tuning in diffusers' adapter format, and pushing/loading through a Hub-compatible local server."""

import os

import hub_server
import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from helpers import TRAIN, read_log, run
from safetensors.torch import load_file

from diffusers_pafm import FlowMatchingPipeline

SMALL = ["--dataset", "digits", "--train_batch_size", "16", "--report_to", "none"]


def sample(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipe(class_labels=[3, 8], num_inference_steps=3, output_type="np", generator=generator).images


@pytest.fixture
def base_pipeline(tmp_path):
    """A plain diffusers DiT pipeline, as a user would fine-tune."""
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=1,
        num_layers=2,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
    )
    path = tmp_path / "base"
    FlowMatchingPipeline(transformer=dit, scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(path)
    return path


def test_lora_fine_tuning_saves_diffusers_adapters_and_resumes_exactly(tmp_path, base_pipeline):
    args = SMALL + [
        "--pretrained_model_name_or_path",
        str(base_pipeline),
        "--lora_rank",
        "4",
        "--learning_rate",
        "1e-2",
        "--checkpointing_steps",
        "2",
        "--use_ema",
        "--ema_decay",
        "0.5",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run([TRAIN, *args, "--max_train_steps", "4", "--output_dir", str(straight)])
    run([TRAIN, *args, "--max_train_steps", "2", "--output_dir", str(resumed)])
    run([TRAIN, *args, "--max_train_steps", "4", "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    assert [r["loss"] for r in read_log(resumed)] == pytest.approx([r["loss"] for r in read_log(straight)], abs=1e-6)
    assert (straight / "checkpoint-2" / "transformer_lora" / "pytorch_lora_weights.safetensors").is_file()

    # the export keeps the base weights untouched and the adapter beside them
    base = load_file(base_pipeline / "transformer" / "diffusion_pytorch_model.safetensors")
    exported = load_file(straight / "transformer" / "diffusion_pytorch_model.safetensors")
    assert base.keys() == exported.keys() and all(torch.equal(base[k], exported[k]) for k in base)
    lora = load_file(straight / "pytorch_lora_weights.safetensors")
    assert set(lora) == set(load_file(resumed / "pytorch_lora_weights.safetensors"))

    pipe = FlowMatchingPipeline.from_pretrained(straight)
    without = sample(pipe)
    pipe.load_lora_weights(str(straight))
    with_lora = sample(pipe)
    assert np.abs(with_lora - without).max() > 1e-3

    # independent reference: merge W + (alpha / r) B A by hand into a plain copy of the base model (alpha = r)
    merged = FlowMatchingPipeline.from_pretrained(base_pipeline)
    modules = dict(merged.transformer.named_modules())
    for key in [k for k in lora if k.endswith("lora_A.weight")]:
        name = key[: -len(".lora_A.weight")]
        delta = lora[name + ".lora_B.weight"] @ lora[key]
        with torch.no_grad():
            modules[name].weight += delta
    np.testing.assert_allclose(sample(merged), with_lora, atol=1e-5)


def test_push_to_hub_uploads_a_clean_export_that_loads_back_identically(tmp_path):
    server, endpoint = hub_server.serve()
    token = "hf_secret_token_for_the_local_hub"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    out = tmp_path / "out"
    try:
        result = run(
            [
                TRAIN,
                *SMALL,
                "--model_size",
                "test",
                "--max_train_steps",
                "2",
                "--checkpointing_steps",
                "1",
                "--report_to",
                "tensorboard",
                "--logging_dir",
                "tb_custom",
                "--push_to_hub",
                "--hub_model_id",
                "user/pafm-digits",
                "--output_dir",
                str(out),
            ],
            env=env,
        )
        assert token not in result.stdout + result.stderr
        files = set(hub_server.REPOS["user/pafm-digits"]["files"])
        # the exact allow-list: the pipeline, its card and validation images; no logs, data report or run config
        assert files == {
            "README.md",
            "label_map.json",
            "model_index.json",
            "scheduler/scheduler_config.json",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors",
        }, sorted(files)
        assert (out / "data_report.json").is_file() and any((out / "tb_custom").rglob("events.out.tfevents*"))
        assert (out / "checkpoint-2").is_dir() and not any(f.startswith("checkpoint-") for f in files)
        assert not any(f.startswith("logs") or f.endswith(".jsonl") for f in files)
        assert (
            'from_pretrained("user/pafm-digits")'
            in hub_server.REPOS["user/pafm-digits"]["files"]["README.md"].decode()
        )

        compare = tmp_path / "compare.py"
        compare.write_text(
            "import sys, numpy as np, torch\n"
            "from diffusers_pafm import FlowMatchingPipeline\n"
            "def run(src):\n"
            "    pipe = FlowMatchingPipeline.from_pretrained(src)\n"
            "    pipe.set_progress_bar_config(disable=True)\n"
            "    return pipe(class_labels=[1, 2], num_inference_steps=3, output_type='np',\n"
            "                generator=torch.Generator().manual_seed(0)).images\n"
            "hub, local = run('user/pafm-digits'), run(sys.argv[1])\n"
            "assert np.array_equal(hub, local), np.abs(hub - local).max()\n"
            "print('identical')\n"
        )
        assert "identical" in run([str(compare), str(out)], env=env).stdout
    finally:
        server.shutdown()
