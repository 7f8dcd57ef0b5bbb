"""open_clip loading by local folder, and a tiny in-project CLIP whose likelihood ranks the true caption first."""

import pytest
import torch

from diffusers_pafm import BatchCandidates, CLIPLikelihood, FlowBatch, fit_clip, load_clip, save_clip, tiny_clip_config
from diffusers_pafm.data import make_shapes

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_clip_config(image_size=32)
    directory = save_clip(open_clip.CLIP(**config), config, tmp_path_factory.mktemp("clip") / "tiny")
    bundle = load_clip(directory)  # the real local-folder loading path
    images, captions = make_shapes(2000, seed=0)
    pixels = torch.stack([bundle.preprocess(im) for im in images])
    fit_clip(bundle.model, pixels, captions, bundle.tokenizer, steps=200, batch_size=64, progress=False)
    save_clip(bundle.model, config, directory)
    return directory


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
    images, captions = make_shapes(300, seed=1)  # held-out draws
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
