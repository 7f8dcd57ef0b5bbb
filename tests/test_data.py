"""Data sources (built-in, image folder, webdataset shards, parquet), encoding with a VAE, precompute, bad inputs."""

import io
import json
import tarfile

import numpy as np
import pytest
from helpers import ROOT, TRAIN, read_log, run, tiny_vae
from PIL import Image

from diffusers_pafm import FlowMatchingPipeline
from diffusers_pafm.data import EncodedDataset, encode_data_source, image_to_tensor, load_data_source


def jpeg(color, size=24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def shards(tmp_path):
    """Two img2dataset-style tar shards (<key>.jpg + <key>.txt) with one corrupt image and one empty caption."""
    folder = tmp_path / "shards"
    folder.mkdir()
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for shard in range(2):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(6):
                key = f"{shard:05d}{i:04d}"
                image = jpeg(colors[i % 3])
                caption = f"a {['red', 'green', 'blue'][i % 3]} square"
                if shard == 1 and i == 4:
                    image = b"\xff\xd8 this is not a jpeg"
                if shard == 1 and i == 5:
                    caption = "   "
                for name, data in ((f"{key}.jpg", image), (f"{key}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def test_image_folder_with_labels_counts_a_corrupt_file(tmp_path):
    for label, color in (("cats", (250, 0, 0)), ("dogs", (0, 0, 250))):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 30), color).save(tmp_path / "imgs" / label / f"{i}.png")
    (tmp_path / "imgs" / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    source = load_data_source(str(tmp_path / "imgs"))
    assert source.num_classes == 2 and source.has_labels and not source.has_captions
    data, report = encode_data_source(source, resolution=8, channels=3, progress=False)
    assert report.seen == 7 and report.kept == 6 and report.skipped == {"corrupt_image": 1}
    assert sorted(data.arrays["class_labels"].tolist()) == [0, 0, 0, 1, 1, 1]
    red = data.arrays["x"][data.arrays["class_labels"] == 0]
    np.testing.assert_allclose(red[:, 0], 250 / 127.5 - 1, atol=1e-6)  # resize + crop keep a flat colour
    with pytest.raises(ValueError, match="caption column 'prompt_text' is not in the dataset"):
        load_data_source(str(tmp_path / "imgs"), caption_column="prompt_text")


def test_webdataset_shards_streamed_and_parquet(tmp_path, shards):
    source = load_data_source(str(shards), streaming=True)
    assert source.has_captions and source.length is None
    data, report = encode_data_source(source, resolution=16, channels=3, progress=False)
    assert report.seen == 12 and report.kept == 10
    assert report.skipped == {"corrupt_image": 1, "empty_caption": 1}
    assert data.captions[:3] == ["a red square", "a green square", "a blue square"]

    import datasets

    rows = {"image": [{"bytes": jpeg((9, 9, 9)), "path": None}] * 3, "text": ["one", "two", "three"]}
    ds = datasets.Dataset.from_dict(
        rows, features=datasets.Features(image=datasets.Image(), text=datasets.Value("string"))
    )
    ds.to_parquet(str(tmp_path / "part-0.parquet"))
    data, report = encode_data_source(
        load_data_source(str(tmp_path / "part-0.parquet")), resolution=8, channels=3, progress=False
    )
    assert report.kept == 3 and data.captions == ["one", "two", "three"]


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_data_source("mnist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data_source(str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(ValueError, match="image of size 20x12 but the model expects 16x16"):
        image_to_tensor(Image.new("RGB", (20, 12)), 16, 3, resize=False)
    x = np.zeros((4, 1, 8, 8), dtype=np.float32)
    data = EncodedDataset(x, class_labels=np.array([0, 1, 12, 3]), meta={"space": "latent"})
    with pytest.raises(ValueError, match=r"class id 12 at sample 2 is outside \[0, 10\)"):
        data.check(num_classes=10)
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\).*expects \(3, 8, 8\)"):
        data.check(sample_shape=(3, 8, 8))
    x[3, 0, 2, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf in latents of samples \[3\]"):
        EncodedDataset(x, meta={"space": "latent"}).check()


def test_trainer_refuses_bad_configurations(tmp_path):
    from diffusers_pafm import PAFMTrainer, PAFMTrainingConfig

    def train(**kwargs):
        cfg = {"dataset": "digits", "model_size": "test", "max_train_steps": 1, "train_batch_size": 8}
        cfg.update(report_to="none", output_dir=str(tmp_path / "out"), **kwargs)
        return PAFMTrainer(PAFMTrainingConfig(**cfg)).train()

    with pytest.raises(ValueError, match="needs a kNN index"):
        train(candidates="knn")
    with pytest.raises(FileNotFoundError, match="no kNN bank at"):
        train(candidates="knn", knn_index=str(tmp_path / "missing-bank"))
    with pytest.raises(ValueError, match=r"class id \d+ at sample \d+ is outside \[0, 5\)"):
        train(num_classes=5)
    with pytest.raises(ValueError, match=r"--model 'unet': one of \"dit\", \"sd3\""):
        train(model="unet")
    with pytest.raises(ValueError, match="needs captions"):
        train(model="sd3")
    nan_dir = tmp_path / "nan"
    x = np.zeros((32, 1, 8, 8), dtype=np.float32)
    x[5, 0, 0, 0] = np.inf
    EncodedDataset(x, class_labels=np.zeros(32, dtype=np.int64), meta={"space": "latent", "num_classes": 2}).save(
        nan_dir
    )
    with pytest.raises(ValueError, match=r"NaN/inf in latents of samples \[5\]"):
        train(dataset=str(nan_dir))


def test_precompute_with_vae_clip_and_knn_then_train_text_model_on_it(tmp_path, shards):
    tiny_vae(tmp_path / "vae")
    enc = tmp_path / "encoded"
    result = run(
        [
            str(ROOT / "training" / "precompute.py"),
            "--dataset",
            str(shards),
            "--streaming",
            "--resolution",
            "32",
            "--vae",
            str(tmp_path / "vae"),
            "--clip_model",
            "tiny",
            "--clip_train_steps",
            "5",
            "--build_knn_index",
            "--knn_k",
            "4",
            "--knn_features",
            "clip_image",
            "--output_dir",
            str(enc),
        ]
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["num_samples"] == 10 and summary["sample_shape"] == [4, 16, 16]
    assert summary["report"]["skipped"] == {"corrupt_image": 1, "empty_caption": 1}
    report = json.loads((enc / "report.json").read_text())["report"]
    assert any(key.startswith("000010004") for key in report["skipped_keys"]["corrupt_image"])
    data = EncodedDataset.load(enc)
    assert isinstance(data.arrays["x"], np.memmap) and data.arrays["text_hidden"].shape[:2] == (10, 16)
    for folder in ("vae", "text_encoder", "clip", "knn"):
        assert (enc / folder).is_dir(), folder

    out = tmp_path / "out"
    run(
        [
            TRAIN,
            "--dataset",
            str(enc),
            "--model",
            "sd3",
            "--model_size",
            "test",
            "--candidates",
            "knn",
            "--condition_likelihood",
            "clip",
            "--train_batch_size",
            "4",
            "--max_train_steps",
            "2",
            "--report_to",
            "none",
            "--output_dir",
            str(out),
        ]
    )
    assert len(read_log(out)) == 2
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    pipe = FlowMatchingPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt="a red square", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)  # decoded by the VAE from 4x16x16 latents


def test_shapes_captions_parse_back_to_their_attributes_and_jitter_varies_the_image():
    from diffusers_pafm.data import SHAPE_ATTRIBUTES, caption_attributes, make_shapes

    images, captions = make_shapes(200, resolution=16, seed=3)
    ids = caption_attributes(captions)
    rebuilt = [
        f"a {SHAPE_ATTRIBUTES[0][s]} {SHAPE_ATTRIBUTES[1][c]} {SHAPE_ATTRIBUTES[2][k]} at the {SHAPE_ATTRIBUTES[3][p]}"
        for s, c, k, p in ids.tolist()
    ]
    assert rebuilt == captions and ids.shape == (200, 4)
    assert caption_attributes(["a large yellow triangle at the bottom right"]).tolist() == [[1, 3, 2, 3]]
    with pytest.raises(ValueError, match="unknown attribute"):
        caption_attributes(["a huge red circle at the top left"])
    with pytest.raises(ValueError, match="not a shapes caption"):
        caption_attributes(["red circle"])

    def same_caption_pair(jitter):
        images, captions = make_shapes(300, resolution=16, seed=0, jitter=jitter)
        seen = {}
        for image, caption in zip(images, captions):
            if caption in seen:
                return np.asarray(seen[caption]), np.asarray(image)
            seen[caption] = image

    a, b = same_caption_pair(0.0)
    assert np.array_equal(a, b)  # no jitter: a caption is one image
    a, b = same_caption_pair(0.06)
    assert not np.array_equal(a, b)


def test_caption_as_class_numbers_distinct_captions():
    from diffusers_pafm.trainers.pafm import caption_classes

    ids, count = caption_classes(["b", "a", "b", "c", "a"])
    assert ids.tolist() == [0, 1, 0, 2, 1] and count == 3
