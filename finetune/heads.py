"""Task heads on a backbone's pooled features, and the backbone + head module that full fine-tuning trains."""

from __future__ import annotations

import torch
from torch import nn


class LinearHead(nn.Module):
    """(B, feature_dim) -> (B, out_dim): dropout, then a linear layer (small init, as MAE's fine-tune)."""

    def __init__(self, feature_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(feature_dim, out_dim)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))


class FineTuneModel(nn.Module):
    """(B, 1, D, H, W) -> (B, out_dim): ``backbone.forward_features`` then a ``LinearHead``."""

    def __init__(self, backbone: nn.Module, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head = LinearHead(backbone.feature_dim, out_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x))  # (B, feature_dim) -> (B, out_dim)
