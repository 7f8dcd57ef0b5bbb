"""Bad inputs, one test each: a clear error naming the flag / file / sample and what would be accepted, or a counted
skip. Read as a list of cases; the ones that need a whole training run live next to the feature they guard:

* resume with a changed schedule / batch / objective / model size: ``test_preemption.py``
* SIGTERM checkpoint and exact resume: ``test_preemption.py``; stale ``.checkpoint-N.tmp-*`` folders and ``kill -9``
  during a checkpoint write: ``test_trainer.py``
* the pushed export is an allow-list (exact file list): ``test_lora_and_hub.py``
* ``posterior_velocity`` exact as t -> 0, non-finite candidates named: ``test_posterior.py``
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_pafm import PAFMTrainer, PAFMTrainingConfig, VFMTrainer, VFMTrainingConfig
from diffusers_pafm.data import encode_data_source, load_data_source, prepare_dataset
from diffusers_pafm.models.clip import load_clip, save_clip, tiny_clip_config, train_tiny_clip


def jpeg(color, size=12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shard(path, keys, caption=b"a red square"):
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for name, data in ((f"{key}.jpg", jpeg((200, 20, 20))), (f"{key}.txt", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def encode(path, **kwargs):
    strict = kwargs.pop("strict", False)
    remap = kwargs.pop("remap_labels", False)
    source = load_data_source(str(path), **kwargs)
    return encode_data_source(source, resolution=8, channels=3, progress=False, strict=strict, remap_labels=remap)


def parquet(path, images, **columns):
    import datasets

    features = {"image": datasets.Image()} if images and isinstance(images[0], dict) else {}
    rows = {"image": images, **columns}
    ds = datasets.Dataset.from_dict(rows)
    if features:
        ds = ds.cast_column("image", features["image"])
    ds.to_parquet(str(path))
    return path


def pafm_config(tmp_path, **kwargs):
    cfg = {"dataset": "digits", "model_size": "test", "max_train_steps": 1, "train_batch_size": 8}
    cfg.update(report_to="none", output_dir=str(tmp_path / "out"), validation_steps=0)
    cfg.update(kwargs)
    return PAFMTrainingConfig(**cfg)


# ---- data: every sample accounted for ------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", [False, True])
def test_truncated_shard_is_a_counted_damaged_file_or_an_error_with_strict_data(tmp_path, streaming):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "00000.tar", [f"a{i}" for i in range(8)])
    write_shard(folder / "00001.tar", [f"b{i}" for i in range(8)])
    whole = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(whole[:15360])  # cut after 6 complete samples, as a failed copy would
    _, report = encode(folder, streaming=streaming)
    assert report.seen == 14 and report.kept == 14  # what is there is read ...
    (entry,) = report.damaged_files["truncated"]  # ... and the loss is named, not silent
    assert "00001.tar" in entry and "6 samples before the cut" in entry
    with pytest.raises(ValueError, match=r"--strict_data: truncated file: .*00001.tar"):
        encode(folder, streaming=streaming, strict=True)


def test_shard_of_random_bytes_is_left_out_and_named(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "00000.tar", [f"a{i}" for i in range(4)])
    (folder / "00001.tar").write_bytes(np.random.default_rng(0).bytes(4096))
    _, report = encode(folder)
    assert report.kept == 4 and "00001.tar" in report.damaged_files["unreadable"][0]
    (folder / "00000.tar").unlink()
    with pytest.raises(ValueError, match=r"no readable tar shard in .*00001.tar"):
        encode(folder)


def test_strict_data_refuses_skipped_samples(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "ok.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _, report = encode(tmp_path / "imgs")
    assert report.skipped == {"corrupt_image": 1}
    with pytest.raises(ValueError, match=r"--strict_data: 1 samples skipped as corrupt_image"):
        encode(tmp_path / "imgs", strict=True)


def test_non_utf8_metadata_names_the_file_and_line(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_bytes(
        b'{"file_name": "0.png", "text": "ok"}\n{"file_name": "1.png", "text": "caf\xe9"}\n'
    )
    with pytest.raises(ValueError, match=r"metadata.jsonl line 2 is not UTF-8 .*save the file as UTF-8"):
        load_data_source(str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png"}\n{"file_name": "1.png", \n')
    with pytest.raises(ValueError, match=r"metadata.jsonl line 2 is not JSON"):
        load_data_source(str(tmp_path))


def test_parquet_with_an_integer_image_column_names_the_column_and_type(tmp_path):
    path = parquet(tmp_path / "p.parquet", [1, 2, 3], text=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"image column 'image' .* holds int64 values; expected encoded image bytes"):
        load_data_source(str(path))


def test_string_labels_are_mapped_to_sorted_ids_and_named(tmp_path):
    images = [{"bytes": jpeg((i * 40, 0, 0)), "path": None} for i in range(4)]
    path = parquet(tmp_path / "p.parquet", images, label=["dog", "cat", "dog", "bird"])
    data, _ = encode(path)
    assert data.arrays["class_labels"].tolist() == [2, 1, 2, 0]  # bird=0, cat=1, dog=2
    assert data.meta["label_names"] == ["bird", "cat", "dog"] and data.num_classes == 3
    with pytest.raises(ValueError, match="holds strings; .*run without --streaming"):
        load_data_source(str(path), streaming=True)


def test_sparse_class_id_is_an_error_naming_it_or_mapped_with_remap_labels(tmp_path):
    images = [{"bytes": jpeg((i * 40, 0, 0)), "path": None} for i in range(4)]
    path = parquet(tmp_path / "p.parquet", images, label=[0, 1, 1, 1_000_000])
    with pytest.raises(ValueError, match=r"largest, 1000000 \(sample '3'\), would make a model with 1000001 classes"):
        encode(path)
    data, _ = encode(path, remap_labels=True)
    assert data.arrays["class_labels"].tolist() == [0, 1, 1, 2] and data.num_classes == 3
    assert data.meta["label_names"] == ["0", "1", "1000000"]


def test_remapped_labels_ship_with_the_pipeline_as_label_map_json(tmp_path):
    images = [{"bytes": jpeg((i * 15, 100, 0), size=8), "path": None} for i in range(16)]
    path = parquet(tmp_path / "p.parquet", images, label=[7, 900] * 8)
    result = PAFMTrainer(pafm_config(tmp_path, dataset=str(path), resolution=8, remap_labels=True)).train()
    assert json.loads((result.export_dir / "label_map.json").read_text()) == {"0": "7", "1": "900"}
    assert result.export_dir.joinpath("transformer", "config.json").is_file()


def test_precompute_folder_without_meta_json_says_it_was_not_finished(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 8, 8), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="no meta.json: a precompute.py folder that was not written"):
        load_data_source(str(tmp_path))


# ---- configs checked against the data before a model is built ------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        ({"class_dropout": 2.0}, r"--class_dropout 2.0: a probability in \[0, 1\)"),
        ({"max_train_steps": 0}, r"--max_train_steps 0: .*0 would export an untrained model"),
        ({"train_batch_size": 0}, r"--train_batch_size 0: a positive integer"),
        ({"checkpointing_steps": 0}, r"--checkpointing_steps 0: a positive integer"),
        ({"logging_dir": "../elsewhere"}, r"--logging_dir '../elsewhere': a sub-folder name inside --output_dir"),
        ({"candidates": "faiss"}, r"--candidates 'faiss': one of batch, class_bank, knn"),
    ],
)
def test_config_values_are_refused_with_the_flag_and_what_is_accepted(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        pafm_config(tmp_path, **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on a CUDA machine")
def test_fp16_on_cpu_is_refused_instead_of_silently_training_in_fp32(tmp_path):
    with pytest.raises(ValueError, match="fp16 autocast needs a CUDA GPU"):
        pafm_config(tmp_path, mixed_precision="fp16")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tasks": ","}, r"--tasks ',': a comma-separated list of"),
        ({"tasks": "box_inpaint,deblur"}, r"unknown \['deblur'\]; choose from"),
        ({"tasks": "box_inpaint,box_inpaint"}, r"each task once"),
    ],
)
def test_vfm_task_lists_are_checked(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        VFMTrainingConfig(output_dir=str(tmp_path), report_to="none", pretrained_model_name_or_path="x", **options)


def test_vfm_without_a_trained_flow_map_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path is required"):
        VFMTrainer(VFMTrainingConfig(output_dir=str(tmp_path), report_to="none"))


def test_resolution_the_patch_size_does_not_divide_names_both(tmp_path):
    with pytest.raises(ValueError, match=r"--patch_size 4 does not divide the model input size 18 .*e\.g\. 16"):
        PAFMTrainer(pafm_config(tmp_path, resolution=18, patch_size=4)).train()


def test_knn_index_of_other_data_is_refused(tmp_path):
    from diffusers_pafm.pafm.knn import build_knn_bank

    bank = build_knn_bank(tmp_path / "bank", np.random.default_rng(0).random((1797, 3), dtype=np.float32), k=2)
    with pytest.raises(ValueError, match=r"kNN index .* holds 1797 samples of shape \(3,\) .* of shape \(1, 16, 16\)"):
        PAFMTrainer(pafm_config(tmp_path, candidates="knn", knn_index=str(bank))).train()


def test_sd3_without_a_caption_column_lists_the_columns(tmp_path):
    images = [{"bytes": jpeg((i * 15, 100, 0), size=8), "path": None} for i in range(8)]
    path = parquet(tmp_path / "p.parquet", images, description=["a red square"] * 8)
    with pytest.raises(ValueError, match=r"needs captions.*columns: \['image', 'description'\].*--caption_column"):
        PAFMTrainer(pafm_config(tmp_path, dataset=str(path), model="sd3", resolution=8)).train()


# ---- weights: safetensors only -------------------------------------------------------------------------------
def test_pickle_only_weights_folder_is_refused_with_a_conversion_command_that_works(tmp_path):
    from diffusers_pafm.models import PeftDiTTransformer2DModel, build_dit

    folder = tmp_path / "dit"
    model = build_dit("test", 1, 8, 10)
    model.save_pretrained(folder, safe_serialization=False)
    assert [p.name for p in folder.iterdir()] != [] and not list(folder.glob("*.safetensors"))
    with pytest.raises(OSError, match="holds pickled weights only \\(diffusion_pytorch_model.bin\\)") as error:
        PeftDiTTransformer2DModel.from_pretrained(folder)
    command = str(error.value).split("convert it once:\n", 1)[1].strip()
    assert command.startswith('python -c "') and command.endswith('"')
    subprocess.run([sys.executable, "-c", command[len('python -c "') : -1]], check=True)
    reloaded = PeftDiTTransformer2DModel.from_pretrained(folder)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="use_safetensors=False: diffusers-pafm loads safetensors weights only"):
        PeftDiTTransformer2DModel.from_pretrained(folder, use_safetensors=False)


def test_clip_folder_with_a_pretrained_file_is_refused_not_ignored(tmp_path):
    import open_clip

    folder = save_clip(open_clip.CLIP(**tiny_clip_config(image_size=16)), tiny_clip_config(image_size=16), tmp_path)
    with pytest.raises(ValueError, match="holds its own weights, so --clip_pretrained 'other.safetensors' would be"):
        load_clip(folder, pretrained="other.safetensors")
    with pytest.raises(ValueError, match="--clip_pretrained 'weights.pt' is a pickle"):
        load_clip("ViT-B-32", pretrained="weights.pt")


def test_tiny_clip_appears_only_when_fitted_and_is_refitted_for_other_data(tmp_path):
    shapes = {"dataset": "shapes", "resolution": 16, "clip_train_steps": 3, "progress": False}
    clip_dir = tmp_path / "clip"
    with pytest.raises(Exception):  # a fit that fails part-way (here: an image that is not one) leaves nothing
        train_tiny_clip([Image.new("RGB", (16, 16)), "not an image"], ["a", "b"], clip_dir, 3, 16, 0, False)
    assert not clip_dir.exists() and not list(tmp_path.glob(".clip.tmp-*"))

    prepare_dataset(**shapes, max_samples=48, work_dir=tmp_path)
    fit = json.loads((clip_dir / "fit.json").read_text())
    assert fit["examples"] == 48 and fit["steps"] == 3
    weights = clip_dir / "open_clip_model.safetensors"
    first = weights.stat().st_mtime_ns
    prepare_dataset(**shapes, max_samples=48, work_dir=tmp_path)  # same data and settings: reused
    assert weights.stat().st_mtime_ns == first
    prepare_dataset(**shapes, max_samples=40, work_dir=tmp_path)  # other data in the same folder: fitted again
    assert json.loads((clip_dir / "fit.json").read_text())["examples"] == 40
    (clip_dir / "fit.json").unlink()  # a folder from an unfinished or older fit: fitted again
    prepare_dataset(**shapes, max_samples=40, work_dir=tmp_path)
    assert (clip_dir / "fit.json").is_file()
