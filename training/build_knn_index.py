#!/usr/bin/env python
"""Build the offline kNN bank for PAFM's kNN candidate source.

    python training/build_knn_index.py --latents latents.npy [--labels labels.npy] [--image_embeds clip.npy] \
        --k 16 --output_dir knn_bank [--features latents|image_embeds] [--per_class] [--backend auto|faiss|torch]

Inputs are ``.npy`` arrays (loaded without pickle): latents [N, ...], optional labels [N] and CLIP image embeddings
[N, E]. Neighbours are searched with faiss (faiss-gpu on every visible GPU when installed) or the torch fallback,
each sample's own index excluded. The bank folder is written atomically; train with
``make_loss("pafm", candidates="knn", knn_bank=<output_dir>)`` or ``--candidates knn``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from diffusers_pafm.pafm import build_knn_bank


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", required=True, help=".npy file of latents [N, ...]")
    parser.add_argument("--labels", default=None, help=".npy file of class ids [N]")
    parser.add_argument("--image_embeds", default=None, help=".npy file of CLIP image embeddings [N, E]")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--features", choices=["latents", "image_embeds"], default="latents")
    parser.add_argument("--metric", choices=["l2", "ip"], default="l2")
    parser.add_argument("--backend", choices=["auto", "faiss", "torch"], default="auto")
    parser.add_argument("--index_factory", default="Flat", help='faiss index_factory string, e.g. "IVF4096,Flat"')
    parser.add_argument("--per_class", action="store_true", help="restrict neighbours to the sample's own class")
    parser.add_argument("--latent_dtype", choices=["float32", "float16"], default="float32")
    return parser.parse_args(argv)


def load_array(path, name):
    if path is None:
        return None
    if not Path(path).is_file():
        sys.exit(f"error: --{name} file not found: {path}")
    return np.load(path, allow_pickle=False)


def main(argv=None):
    args = parse_args(argv)
    latents = load_array(args.latents, "latents")
    labels = load_array(args.labels, "labels")
    embeds = load_array(args.image_embeds, "image_embeds")
    if args.features == "image_embeds" and embeds is None:
        sys.exit("error: --features image_embeds needs --image_embeds")
    start = time.perf_counter()
    path = build_knn_bank(
        args.output_dir,
        latents,
        k=args.k,
        labels=labels,
        image_embeds=embeds,
        features=embeds if args.features == "image_embeds" else None,
        metric=args.metric,
        backend=args.backend,
        index_factory=args.index_factory,
        per_class=args.per_class,
        latent_dtype=args.latent_dtype,
    )
    meta = json.loads((path / "meta.json").read_text())
    print(json.dumps({**meta, "output_dir": str(path), "seconds": round(time.perf_counter() - start, 2)}))


if __name__ == "__main__":
    main()
