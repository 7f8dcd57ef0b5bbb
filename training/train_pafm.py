#!/usr/bin/env python
"""Train (or fine-tune) a diffusers transformer with FM / STF / EFM / StableVM / PAFM.

    accelerate launch training/train_pafm.py --dataset digits --objective pafm --max_train_steps 2000 \
        --output_dir pafm-digits --use_ema --validation_steps 500

Every option is a field of ``diffusers_pafm.PAFMTrainingConfig`` (``--help`` lists them with their defaults);
names follow diffusers' training scripts. The loop itself is ``diffusers_pafm.PAFMTrainer`` (the library's
engine), so the same run works from a notebook. ``<output_dir>`` ends up holding the sampling pipeline
(``FlowMatchingPipeline.from_pretrained(output_dir)``), ``train_log.jsonl``, ``logs/`` (tensorboard),
``validation/*.png`` and ``checkpoint-<step>/`` folders (``--resume_from_checkpoint latest``).
"""

from transformers import HfArgumentParser

from diffusers_pafm import PAFMTrainer, PAFMTrainingConfig


def main(argv=None):
    (config,) = HfArgumentParser(PAFMTrainingConfig).parse_args_into_dataclasses(argv)
    trainer = PAFMTrainer(config)
    result = trainer.train()
    if not result.stopped:
        trainer.accelerator.print(result.summary())


if __name__ == "__main__":
    main()
