"""Self-supervised objectives: MAE (ViTs), SimCLR and MoCo v3 (ViTs and CNNs).

Each is a plain ``nn.Module`` holding the backbone as ``encoder`` (what gets exported) whose
``forward(batch)`` returns a dict with ``"loss"``. Optional hooks the trainer calls: ``after_step(step,
total_steps)`` (MoCo's momentum update), ``images(batch, out)`` (MAE's TensorBoard slices),
``no_weight_decay()``.
"""

from __future__ import annotations

import torch.nn as nn

from common.errors import ConfigError
from pretrain.objectives.mae import MaskedAutoencoder
from pretrain.objectives.moco import MoCoV3
from pretrain.objectives.simclr import SimCLR

OBJECTIVES = ("mae", "simclr", "moco")
# which batch keys an objective reads: MAE one volume, the contrastive objectives two augmented views
NEEDS_VIEWS = {"mae": False, "simclr": True, "moco": True}


def build_objective(cfg, encoder: nn.Module) -> nn.Module:
    """The objective ``cfg.name`` (an ``ObjectiveConfig``) around ``encoder``."""
    if cfg.name == "mae":
        m = cfg.mae
        return MaskedAutoencoder(
            encoder, m.mask_ratio, m.masking, m.norm_pix_loss, m.decoder_dim, m.decoder_depth, m.decoder_heads
        )
    c = cfg.contrastive
    if cfg.name == "simclr":
        return SimCLR(encoder, c.proj_hidden, c.proj_dim, c.temperature)
    if cfg.name == "moco":
        return MoCoV3(encoder, c.proj_hidden, c.proj_dim, c.temperature, c.momentum)
    raise ConfigError(f"objective.name must be one of {OBJECTIVES}, got {cfg.name!r}")


__all__ = ["MaskedAutoencoder", "MoCoV3", "NEEDS_VIEWS", "OBJECTIVES", "SimCLR", "build_objective"]
