"""What a pre-training run trains in. ``common.precision`` and ``common.bf16_check`` decide; this module hands
them the run's inputs: ``train.precision`` resolved for DeepSpeed's accelerator and, where that is bf16, an
example batch of the run's shapes for the model's check (``auto``: and timing) against fp32.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pretrain.engine import resolve_run_precision, train_precision

log = logging.getLogger("pretrain")


def run_precision(cfg, objective: nn.Module) -> str:
    """``bf16`` or ``fp32`` for ``cfg.train.precision`` and ``objective`` (an ``Objective``), logged with why."""
    precision = resolve_run_precision(cfg.train.precision)
    if precision != "bf16":
        return precision
    # (B, 1, D, H, W) per input the objective takes, plus its covariates (ages in years, as a cohort has)
    keys = ("view1", "view2") if objective.needs_views else ("image",)
    example = {k: torch.rand(cfg.data.batch_size, 1, *cfg.data.shape) for k in keys}
    example.update({c: 20 + 60 * torch.rand(cfg.data.batch_size) for c in objective.needs_covariates})
    precision, why = train_precision(objective, example, cfg.train.precision)
    log.info("train.precision %s -> %s: %s", cfg.train.precision, precision, why)
    return precision
