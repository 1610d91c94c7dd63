"""Task heads on a backbone's pooled features (a new one, or a fitted linear probe as one: ``linear_head``), and
the backbone + head module that full fine-tuning trains and a model folder holds (``finetune.model_folder``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from finetune.config import HEAD_NORMS


class LinearHead(nn.Module):
    """(B, feature_dim) -> (B, out_dim): feature normalisation, dropout, then a linear layer (small init, as
    MAE's fine-tune).

    ``norm="batch"`` standardises every feature over the batch (``BatchNorm1d`` without affine parameters, as
    MAE's linear probe and scikit-learn's ``StandardScaler`` in our probe). Registered brains look alike, so a
    pooled feature's spread across subjects is a tiny share of its magnitude; without this a ViT's
    LayerNorm-ed, mean-pooled features give the head almost the same vector for every subject and training
    sits at chance loss (ViT-tiny from scratch on a registered AD cohort: held-out ROC-AUC at most 0.67 in
    80 epochs without it, 0.996 in 30 with it; docs/results.md).
    """

    def __init__(self, feature_dim: int, out_dim: int, dropout: float = 0.0, norm: str = "batch"):
        super().__init__()
        if norm not in HEAD_NORMS:
            raise ValueError(f"norm must be one of {HEAD_NORMS}, got {norm!r}")
        self.norm = nn.BatchNorm1d(feature_dim, affine=False) if norm == "batch" else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(feature_dim, out_dim)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(x)))


def linear_head(fit: dict, classification: bool) -> LinearHead:
    """A linear model in feature space (``finetune.linear.fit_linear``: ``((x - mean) / scale) @ weight.T + bias``)
    as a float64 ``LinearHead`` without normalisation whose outputs are its decision values: softmax gives its
    probabilities (a binary logit z as the two logits -z/2, z/2), or they are its predictions. float64, as the
    probe computes: its standardised weights can be large and cancel, and an age needs more than float32 keeps."""
    weight = np.asarray(fit["weight"], np.float64) / fit["scale"]  # (k, d): the standardisation folded in
    bias = np.asarray(fit["bias"], np.float64) - weight @ fit["mean"]
    if classification and weight.shape[0] == 1:
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.concatenate([-bias / 2, bias / 2])
    head = LinearHead(weight.shape[1], weight.shape[0], norm="none").double()
    with torch.no_grad():
        head.fc.weight.copy_(torch.from_numpy(weight))
        head.fc.bias.copy_(torch.from_numpy(bias))
    return head.eval()


class FineTuneModel(nn.Module):
    """(B, 1, D, H, W) -> (B, out_dim): ``backbone.forward_features`` then a ``LinearHead`` (a new one, or
    ``head``: a fitted probe, a saved head)."""

    def __init__(
        self,
        backbone: nn.Module,
        out_dim: int,
        dropout: float = 0.0,
        norm: str = "batch",
        head: LinearHead | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else LinearHead(backbone.feature_dim, out_dim, dropout, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x))  # (B, feature_dim) -> (B, out_dim)
