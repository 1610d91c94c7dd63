"""Projection / prediction MLPs of the contrastive objectives (SimCLR, MoCo v3)."""

from __future__ import annotations

import torch.nn as nn


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, last_bn: bool) -> nn.Sequential:
    """Linear-BN-ReLU blocks then a Linear, optionally a final affine-free BN (MoCo v3's projector).

    BatchNorm is per rank: ``torch.nn.SyncBatchNorm`` runs on CUDA only, and the contrastive losses already
    see every rank's keys through an all-gather.
    """
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
