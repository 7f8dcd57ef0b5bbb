#!/usr/bin/env python
"""Encode a dataset once for training: VAE latents, text-encoder states, CLIP embeddings, faiss kNN index.

    python training/precompute.py --dataset /data/cc12m-shards --streaming --vae stabilityai/sd-vae-ft-mse \
        --clip_model ViT-B-32 --clip_pretrained laion2b_s34b_b79k --text_encoder ViT-B-32 \
        --resolution 256 --build_knn_index --knn_k 16 --output_dir cc12m-encoded

    accelerate launch training/train_pafm.py --dataset cc12m-encoded --model sd3 --candidates knn ...

Writes ``<output_dir>/`` (atomically): memory-mapped arrays (``x.npy`` latents or pixels, ``class_labels.npy``,
``text_hidden.npy`` / ``text_pooled.npy``, ``clip_text.npy`` / ``clip_image.npy``), ``captions.json``, the encoders
it used (``vae/``, ``text_encoder/``, ``clip/``) so training and export reuse them, ``knn/`` (the kNN bank for
``--candidates knn``) and ``report.json``: how many examples were seen and kept, and every corrupt image / empty
caption / non-finite latent skipped (counted, first keys listed).
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import HfArgumentParser

from diffusers_pafm.data import DataConfig, EncoderConfig, prepare_dataset
from diffusers_pafm.pafm import build_knn_bank
from diffusers_pafm.utils import atomic_directory, option


@dataclass
class PrecomputeConfig(DataConfig, EncoderConfig):
    """The data options of the trainers, the encoders, and the kNN bank to build."""

    output_dir: str = option("the encoded dataset folder (written atomically)", default="encoded-data")
    no_text_encoder: bool = option("skip token states (class-conditional use)", default=False)
    build_knn_index: bool = option("also build the kNN bank in <output_dir>/knn", default=False)
    knn_k: int = option("neighbours per sample", default=16)
    knn_features: str = option('"latents" or "clip_image": what the neighbours are searched in', default="latents")
    per_class: bool = option("restrict neighbours to the sample's class", default=False)
    seed: int = option("seed of the tiny CLIP fit and the patch crops", default=0)


def parse_args(argv=None) -> PrecomputeConfig:
    (config,) = HfArgumentParser(PrecomputeConfig, description=__doc__).parse_args_into_dataclasses(argv)
    if config.knn_features not in ("latents", "clip_image"):
        raise SystemExit(f"error: --knn_features must be latents or clip_image, got {config.knn_features!r}")
    return config


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    with atomic_directory(output_dir) as tmp:
        data, report, encoders = prepare_dataset(
            **args.prepare_kwargs(), work_dir=tmp, want_text_encoder=not args.no_text_encoder, seed=args.seed
        )
        data.check()
        data.write_files(tmp)
        encoders.save(tmp)
        if args.build_knn_index:
            features = data.arrays.get("clip_image") if args.knn_features == "clip_image" else None
            if args.knn_features == "clip_image" and features is None:
                raise SystemExit("error: --knn_features clip_image needs CLIP embeddings (give --clip_model)")
            build_knn_bank(
                tmp / "knn",
                data.arrays["x"],
                k=args.knn_k,
                labels=data.arrays.get("class_labels"),
                image_embeds=data.arrays.get("clip_image"),
                features=features,
                metric="ip" if features is not None else "l2",
                per_class=args.per_class,
            )
        summary = {
            "output_dir": str(output_dir),
            "num_samples": len(data),
            "sample_shape": list(data.sample_shape),
            "arrays": sorted(data.arrays),
            "report": report.to_dict(),
            "knn_index": args.build_knn_index,
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / "report.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
