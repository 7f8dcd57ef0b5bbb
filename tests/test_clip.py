"""open_clip loading by local folder, and a tiny in-project CLIP whose likelihood ranks the true caption first."""

import pytest
import torch

from diffusers_pafm import BatchCandidates, CLIPLikelihood, FlowBatch, load_clip, save_clip, tiny_clip_config
from diffusers_pafm.data import make_shapes
from diffusers_pafm.models import train_tiny_clip

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory):
    # unjittered shapes (a caption is one image): what is checked is the likelihood, not how hard the data is
    images, captions = make_shapes(2000, seed=0, jitter=0.0)
    return train_tiny_clip(images, captions, tmp_path_factory.mktemp("clip") / "tiny", steps=350, progress=False)


def test_save_and_load_round_trip(tmp_path):
    config = tiny_clip_config(image_size=32)
    model = open_clip.CLIP(**config).eval()
    bundle = load_clip(save_clip(model, config, tmp_path / "clip"))
    captions = ["a small red circle at the top left", "a large blue square at the bottom right"]
    tokens = bundle.tokenizer(captions)
    assert tokens.shape == (2, 16)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(bundle.encode_text(captions), expected)


def test_clip_likelihood_ranks_the_true_caption_first(trained_clip):
    bundle = load_clip(trained_clip)
    images, captions = make_shapes(300, seed=1, jitter=0.0)  # held-out draws
    unique = {}
    for image, caption in zip(images, captions):
        unique.setdefault(caption, image)
    captions = list(unique)[:32]
    image_embeds = bundle.encode_image([unique[c] for c in captions])
    text_embeds = bundle.encode_text(captions)
    batch = FlowBatch(x=torch.zeros(len(captions), 1), text_embeds=text_embeds, image_embeds=image_embeds)
    log_p = CLIPLikelihood(temperature=0.01)(batch, BatchCandidates()(batch))
    top1 = (log_p.argmax(1) == torch.arange(len(captions))).float().mean().item()
    assert top1 >= 0.75, f"true caption ranked first for only {top1:.0%} of pairs (chance {1 / len(captions):.0%})"
