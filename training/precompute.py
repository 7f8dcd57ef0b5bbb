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

import argparse
import json
import time
from pathlib import Path

from diffusers_pafm.data import prepare_dataset
from diffusers_pafm.pafm import build_knn_bank
from diffusers_pafm.utils import atomic_directory


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="built-in name, image folder, .tar/.parquet shards, Hub id")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dataset_split", default="train")
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--caption_column", default=None)
    parser.add_argument("--label_column", default=None)
    parser.add_argument("--streaming", action="store_true", help="iterate shards without materialising them")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--no_resize", action="store_true", help="refuse images of another size instead of resizing")
    parser.add_argument("--vae", default=None, help="AutoencoderKL folder / Hub id (latent space); default: pixels")
    parser.add_argument("--text_encoder", default=None, help="open_clip name/folder or transformers model (MMDiT)")
    parser.add_argument("--no_text_encoder", action="store_true", help="skip token states (class-conditional use)")
    parser.add_argument("--clip_model", default=None, help='open_clip name / folder, or "tiny" (fit on the data)')
    parser.add_argument("--clip_pretrained", default=None)
    parser.add_argument("--clip_train_steps", type=int, default=300)
    parser.add_argument("--build_knn_index", action="store_true", help="also build the kNN bank in <output_dir>/knn")
    parser.add_argument("--knn_k", type=int, default=16)
    parser.add_argument("--knn_features", choices=["latents", "clip_image"], default="latents")
    parser.add_argument("--per_class", action="store_true", help="restrict neighbours to the sample's class")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    with atomic_directory(output_dir) as tmp:
        data, report, encoders = prepare_dataset(
            args.dataset,
            work_dir=tmp,
            split=args.dataset_split,
            image_column=args.image_column,
            caption_column=args.caption_column,
            label_column=args.label_column,
            streaming=args.streaming,
            max_samples=args.max_samples,
            resolution=args.resolution,
            vae=args.vae,
            text_encoder=args.text_encoder,
            want_text_encoder=not args.no_text_encoder,
            clip_model=args.clip_model,
            clip_pretrained=args.clip_pretrained,
            clip_train_steps=args.clip_train_steps,
            resize=not args.no_resize,
            seed=args.seed,
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
