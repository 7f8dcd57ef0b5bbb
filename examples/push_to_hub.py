#!/usr/bin/env python
"""Share a trained export on the Hugging Face Hub (the model card it holds becomes the repo's README).

    huggingface-cli login            # or export HF_TOKEN=...
    python examples/push_to_hub.py --folder demo_output/runs/vfm-patches --repo_id you/vfm-patches

Uploads the pipeline folders, ``model_index.json``, ``README.md`` and validation images; never ``checkpoint-*``,
logs or the token. Others then load it with ``VariationalFlowMapPipeline.from_pretrained("you/vfm-patches")``
(or ``FlowMatchingPipeline`` for a PAFM export).
"""

import argparse
from pathlib import Path

from diffusers_pafm import push_export


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="an export written by the trainers (has model_index.json)")
    parser.add_argument("--repo_id", required=True)
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    if not (Path(args.folder) / "model_index.json").is_file():
        parser.error(f"{args.folder} is not a pipeline export (no model_index.json)")
    url = push_export(args.folder, args.repo_id, private=args.private)
    print(f"pushed {args.folder} to {url}")


if __name__ == "__main__":
    main()
