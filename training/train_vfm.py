#!/usr/bin/env python
"""Train a flow map with MeanFlow, then a Variational Flow Map (noise adapter + flow map) for inverse problems.

    # 1. flow map from a PAFMTrainer FM pipeline (the flow map starts equal to the FM model)
    accelerate launch training/train_vfm.py --stage meanflow --dataset patches \
        --pretrained_model_name_or_path pafm-patches --max_train_steps 20000 --output_dir flowmap-patches
    # 2. joint VFM training for box inpainting and 2x super-resolution
    accelerate launch training/train_vfm.py --stage vfm --pretrained_model_name_or_path flowmap-patches \
        --tasks box_inpaint,super_resolution_2x --max_train_steps 20000 --output_dir vfm-patches

    # or: one-step reward-tilted generation from a class-conditional flow map (trained with --dataset digits)
    accelerate launch training/train_vfm.py --stage reward --dataset digits --pretrained_model_name_or_path \
        flowmap-digits --reward classifier:digit-classifier --beta 0.1 --output_dir reward-digits

``--stage`` picks the trainer: ``meanflow`` (:class:`~diffusers_pafm.MeanFlowTrainer`), ``vfm`` or
``adapter_only`` (:class:`~diffusers_pafm.VFMTrainer`, the latter with ``adapter_only=True``), ``reward``
(:class:`~diffusers_pafm.RewardTrainer`). Every other option is a field of the stage's config (``--stage <stage>
--help``). A VFM result loads with ``VariationalFlowMapPipeline.from_pretrained(output_dir)``, a reward result with
``RewardTiltedFlowMapPipeline.from_pretrained(output_dir)``.
"""

import argparse

from transformers import HfArgumentParser

from diffusers_pafm import (
    MeanFlowTrainer,
    MeanFlowTrainingConfig,
    RewardTrainer,
    RewardTrainingConfig,
    VFMTrainer,
    VFMTrainingConfig,
)

STAGES = {
    "meanflow": (MeanFlowTrainer, MeanFlowTrainingConfig),
    "vfm": (VFMTrainer, VFMTrainingConfig),
    "reward": (RewardTrainer, RewardTrainingConfig),
}
STAGES["adapter_only"] = STAGES["vfm"]


def main(argv=None):
    stage_parser = argparse.ArgumentParser(add_help=False)
    stage_parser.add_argument("--stage", choices=sorted(STAGES), default="vfm")
    stage, rest = stage_parser.parse_known_args(argv)
    trainer_class, config_class = STAGES[stage.stage]
    parser = HfArgumentParser(config_class, description=f"train_vfm.py --stage {stage.stage}")
    (config,) = parser.parse_args_into_dataclasses(rest)
    if stage.stage == "adapter_only":
        config.adapter_only = True
    trainer = trainer_class(config)
    result = trainer.train()
    if not result.stopped:
        trainer.accelerator.print(result.summary())


if __name__ == "__main__":
    main()
