"""Self-supervised objectives: MAE and MAE + contrastive (ViTs), SimCLR, MoCo v3 and y-aware contrastive (ViTs and
CNNs).

Each is an ``Objective`` (``base.py``): an ``nn.Module`` holding the backbone as ``encoder`` (what gets exported)
whose ``forward(batch)`` returns a dict with ``"loss"``, and that declares what it needs (``needs_views``,
``needs_covariates``, ``image_tag``) and implements the hooks it uses (``after_step``, ``images``). ``OBJECTIVES``
below is the one list of them: an objective is added by writing its module and registering it here, with its
builder from ``ObjectiveConfig`` and the model card's words for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from pretrain.objectives.base import Objective
from pretrain.objectives.mae import MaskedAutoencoder
from pretrain.objectives.mae_contrastive import ContrastiveMaskedAutoencoder
from pretrain.objectives.moco import MoCoV3
from pretrain.objectives.simclr import SimCLR
from pretrain.objectives.yaware import YAwareContrastive
from pretrain.registry import Registry


@dataclass(frozen=True)
class RegisteredObjective:
    build: Callable[[Any, nn.Module], Objective]  # (ObjectiveConfig, encoder) -> the objective
    cls: type[Objective]  # what it declares (needs_views, needs_covariates ...) without building it
    description: str  # how the exported model card words it


OBJECTIVES: Registry[RegisteredObjective] = Registry("objective.name", RegisteredObjective)


@OBJECTIVES.register("mae", cls=MaskedAutoencoder, description="masked autoencoding (MAE)")
def _mae(cfg, encoder: nn.Module) -> MaskedAutoencoder:
    m = cfg.mae
    return MaskedAutoencoder(
        encoder, m.mask_ratio, m.masking, m.norm_pix_loss, m.decoder_dim, m.decoder_depth, m.decoder_heads
    )


@OBJECTIVES.register("simclr", cls=SimCLR, description="SimCLR")
def _simclr(cfg, encoder: nn.Module) -> SimCLR:
    c = cfg.contrastive
    return SimCLR(encoder, c.proj_hidden, c.proj_dim, c.temperature, c.queue_size)


@OBJECTIVES.register("moco", cls=MoCoV3, description="MoCo v3")
def _moco(cfg, encoder: nn.Module) -> MoCoV3:
    c = cfg.contrastive
    return MoCoV3(encoder, c.proj_hidden, c.proj_dim, c.temperature, c.momentum, c.queue_size)


@OBJECTIVES.register("yaware", cls=YAwareContrastive, description="y-aware contrastive learning (age kernel)")
def _yaware(cfg, encoder: nn.Module) -> YAwareContrastive:
    c = cfg.contrastive
    return YAwareContrastive(encoder, c.proj_hidden, c.proj_dim, c.temperature, c.sigma)


@OBJECTIVES.register(
    "mae_contrastive",
    cls=ContrastiveMaskedAutoencoder,
    description="masked autoencoding with a contrastive term (MAE + NT-Xent, as CAN)",
)
def _mae_contrastive(cfg, encoder: nn.Module) -> ContrastiveMaskedAutoencoder:
    m, c = cfg.mae, cfg.contrastive
    return ContrastiveMaskedAutoencoder(
        encoder,
        m.mask_ratio,
        m.masking,
        m.norm_pix_loss,
        m.decoder_dim,
        m.decoder_depth,
        m.decoder_heads,
        c.proj_hidden,
        c.proj_dim,
        c.temperature,
        cfg.hybrid.contrastive_weight,
    )


def build_objective(cfg, encoder: nn.Module) -> Objective:
    """The objective ``cfg.name`` (an ``ObjectiveConfig``) around ``encoder``."""
    return OBJECTIVES[cfg.name].build(cfg, encoder)


__all__ = [
    "OBJECTIVES",
    "ContrastiveMaskedAutoencoder",
    "MaskedAutoencoder",
    "MoCoV3",
    "Objective",
    "SimCLR",
    "YAwareContrastive",
    "build_objective",
]
