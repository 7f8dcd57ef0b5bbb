import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# `make test` runs two pytest workers (pytest-xdist) on the 2 CI cores: one thread each, inherited by the scripts the
# tests launch, so that two workers never ask for four threads
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DiTTransformer2DModel  # noqa: E402

torch.set_num_threads(1 if WORKERS > 1 else 2)


def make_tiny_dit(in_channels: int = 1, sample_size: int = 8, num_classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=2,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_type="ada_norm_zero",
    )


@pytest.fixture
def tiny_dit():
    return make_tiny_dit()
