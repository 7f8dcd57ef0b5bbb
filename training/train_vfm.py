#!/usr/bin/env python
"""Train a flow map with MeanFlow, then a Variational Flow Map (noise adapter + flow map) for inverse problems.

    # 1. flow map from a PAFMTrainer FM pipeline (the flow map starts equal to the FM model)
    accelerate launch training/train_vfm.py --stage meanflow --dataset patches \
        --pretrained_model_name_or_path pafm-patches --max_train_steps 20000 --output_dir flowmap-patches
    # 2. joint VFM training for box inpainting and 2x super-resolution
    accelerate launch training/train_vfm.py --stage vfm --pretrained_model_name_or_path flowmap-patches \
        --tasks box_inpaint,super_resolution_2x --max_train_steps 20000 --output_dir vfm-patches

Every option is a field of ``diffusers_pafm.VFMTrainingConfig`` (``--help``). The result loads with
``VariationalFlowMapPipeline.from_pretrained(output_dir)``.
"""

from transformers import HfArgumentParser

from diffusers_pafm import VFMTrainer, VFMTrainingConfig


def main(argv=None):
    (config,) = HfArgumentParser(VFMTrainingConfig).parse_args_into_dataclasses(argv)
    trainer = VFMTrainer(config)
    result = trainer.train()
    trainer.accelerator.print(f"trained {result.global_step} steps; saved to {result.export_dir}")


if __name__ == "__main__":
    main()
