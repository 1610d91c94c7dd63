"""Self-supervised objectives: MAE (ViTs), SimCLR, MoCo v3 and y-aware contrastive (ViTs and CNNs).

Each is an ``Objective`` (``base.py``): an ``nn.Module`` holding the backbone as ``encoder`` (what gets exported)
whose ``forward(batch)`` returns a dict with ``"loss"``, and that declares what it needs (``needs_views``,
``needs_covariates``, ``image_tag``) and implements the hooks it uses (``after_step``, ``images``). The names are
``pretrain.config.OBJECTIVES``.
"""

from __future__ import annotations

import torch.nn as nn

from common.errors import ConfigError
from pretrain.config import OBJECTIVES
from pretrain.objectives.base import Objective
from pretrain.objectives.mae import MaskedAutoencoder
from pretrain.objectives.moco import MoCoV3
from pretrain.objectives.simclr import SimCLR
from pretrain.objectives.yaware import YAwareContrastive

CLASSES: dict[str, type[Objective]] = {
    "mae": MaskedAutoencoder,
    "simclr": SimCLR,
    "moco": MoCoV3,
    "yaware": YAwareContrastive,
}


def objective_class(name: str) -> type[Objective]:
    """The class of objective ``name``: what it declares (``needs_views``, ``needs_covariates``) without building it."""
    if name not in CLASSES:
        raise ConfigError(f"objective.name must be one of {OBJECTIVES}, got {name!r}")
    return CLASSES[name]


def build_objective(cfg, encoder: nn.Module) -> Objective:
    """The objective ``cfg.name`` (an ``ObjectiveConfig``) around ``encoder``."""
    if cfg.name == "mae":
        m = cfg.mae
        return MaskedAutoencoder(
            encoder, m.mask_ratio, m.masking, m.norm_pix_loss, m.decoder_dim, m.decoder_depth, m.decoder_heads
        )
    c = cfg.contrastive
    if cfg.name == "simclr":
        return SimCLR(encoder, c.proj_hidden, c.proj_dim, c.temperature, c.queue_size)
    if cfg.name == "moco":
        return MoCoV3(encoder, c.proj_hidden, c.proj_dim, c.temperature, c.momentum, c.queue_size)
    if cfg.name == "yaware":
        return YAwareContrastive(encoder, c.proj_hidden, c.proj_dim, c.temperature, c.sigma)
    raise ConfigError(f"objective.name must be one of {OBJECTIVES}, got {cfg.name!r}")


__all__ = [
    "MaskedAutoencoder",
    "MoCoV3",
    "Objective",
    "SimCLR",
    "YAwareContrastive",
    "build_objective",
    "objective_class",
]
