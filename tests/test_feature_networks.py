"""Feature networks for the Frechet distance: the in-project classifier learns, Inception loads from safetensors."""

from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

from diffusers_pafm.evaluation import FeatureClassifier, InceptionFeatures, frechet_distance, train_feature_classifier


def test_classifier_learns_two_label_columns_from_simple_rules():
    gen = torch.Generator().manual_seed(0)
    images = 0.3 * torch.randn(600, 3, 8, 8, generator=gen)
    brighter_half = torch.randint(0, 2, (600,), generator=gen)  # head 0: which half of the image is bright
    channel = torch.randint(0, 3, (600,), generator=gen)  # head 1: which channel is bright
    for i in range(600):
        images[i, :, :, 4 * brighter_half[i] : 4 * brighter_half[i] + 4] += 1.0
        images[i, channel[i]] += 1.0
    labels = torch.stack([brighter_half, channel], 1)
    net, accuracy = train_feature_classifier(images, labels, steps=200)
    assert [h.out_features for h in net.heads] == [2, 3]  # sizes inferred from the labels
    assert accuracy >= 0.95
    assert net.features(images[:5]).shape == (5, 64) and net.predict(images[:5]).shape == (5, 2)
    with pytest.raises(ValueError, match="2 heads for 1 label columns"):
        train_feature_classifier(images, brighter_half, head_sizes=(2, 3), steps=1)
    with pytest.raises(ValueError, match="divisible by 4"):
        FeatureClassifier(resolution=10)


def test_inception_features_load_from_safetensors_and_match_the_network(tmp_path):
    extractor = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    cls = extractor.FeatureExtractorInceptionV3
    torch.manual_seed(0)
    # a random-init FID Inception (the real weights cannot be downloaded here): skip torch-fidelity's loading
    with mock.patch.object(torch, "load", lambda *a, **k: {}), mock.patch.object(cls, "load_state_dict"):
        reference = cls("inception-v3-compat", ["2048"], "unused.pth")
    path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))

    features = InceptionFeatures(path)
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    pixels = ((images.expand(-1, 3, -1, -1) + 1) * 127.5).round().to(torch.uint8)
    with torch.no_grad():
        expected = reference(pixels)[0]
    got = features.features(images, batch_size=3)
    assert got.shape == (4, 2048)
    torch.testing.assert_close(got, expected)
    assert float(frechet_distance(got.double(), got.double())) == pytest.approx(0.0, abs=1e-6)

    with pytest.raises(ValueError, match="must be a .safetensors file"):
        InceptionFeatures(tmp_path / "pt_inception.pth")
    with pytest.raises(FileNotFoundError, match="Inception weights not found"):
        InceptionFeatures(tmp_path / "missing.safetensors")
