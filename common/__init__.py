"""Code shared by synth, pretrain and finetune: config, models, attention, checkpoints, data, logging."""

__version__ = "0.1.0"
