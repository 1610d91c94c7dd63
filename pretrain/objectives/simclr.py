"""SimCLR: two augmented views of a volume attract, every other view in the (global) batch repels.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020: the NT-Xent
(normalised temperature-scaled cross-entropy) loss over 2N views, projection MLP on the backbone's features.
Negatives are gathered from all data-parallel ranks, as with SimCLR's large-batch TPU training, and at small
batches may be extended by a queue of past embeddings (``queue_size``; ``queue.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.objectives.base import Objective
from pretrain.objectives.gather import gather_with_grad
from pretrain.objectives.heads import mlp_head
from pretrain.objectives.queue import NegativeQueue


def batch_logits(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, negatives: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine logits of the 2B local anchors against the global batch's 2WB views (then any queued
    ``negatives`` (K, d)), an anchor's own column at -inf; also each anchor's column (2B,) and its other view's."""
    z_local = F.normalize(torch.cat([z1, z2], dim=0).float(), dim=1)  # (2B, d)
    B = z1.shape[0]
    z1_all, rank = gather_with_grad(z_local[:B])  # (W*B, d)
    z2_all, _ = gather_with_grad(z_local[B:])
    n_global = z1_all.shape[0]
    z_all = torch.cat([z1_all, z2_all], dim=0)  # (2WB, d)
    logits = z_local @ z_all.T / temperature  # (2B, 2WB)
    own = torch.arange(B, device=z1.device) + rank * B  # this rank's samples in the global batch
    self_idx = torch.cat([own, own + n_global])  # (2B,) where each anchor sits in z_all
    positive = torch.cat([own + n_global, own])  # (2B,) its other view
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * n_global).bool(), float("-inf"))
    if negatives is not None and len(negatives):
        logits = torch.cat([logits, z_local @ negatives.T.to(z_local.dtype) / temperature], dim=1)  # (2B, 2WB+K)
    return logits, self_idx, positive


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, negatives: torch.Tensor | None = None
) -> torch.Tensor:
    """NT-Xent of paired embeddings z1, z2 (B, d): mean over the 2B local anchors of ``-log exp(s(a, a+)/T) /
    Σ_{k ≠ a} exp(s(a, k)/T)`` with cosine similarity s, over the global batch and the queued ``negatives``.
    Its chance level (all similarities equal) is ln(2WB − 1 + K)."""
    logits, _, positive = batch_logits(z1, z2, temperature, negatives)
    return F.cross_entropy(logits, positive)


class SimCLR(Objective):
    """Backbone + projection MLP; ``forward({"view1", "view2"})`` returns ``{"loss"}``."""

    needs_views = True

    def __init__(
        self,
        encoder: nn.Module,
        proj_hidden: int = 2048,
        proj_dim: int = 256,
        temperature: float = 0.2,
        queue_size: int = 0,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.encoder = encoder
        self.projector = mlp_head(encoder.feature_dim, proj_hidden, proj_dim, num_layers=2, last_bn=False)
        self.temperature = temperature
        self.queue = NegativeQueue(queue_size, proj_dim)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        B = batch["view1"].shape[0]
        views = torch.cat([batch["view1"], batch["view2"]], dim=0)  # (2B, 1, D, H, W): one pass, shared BN
        z = self.projector(self.encoder.forward_features(views))  # (2B, proj_dim)
        loss = nt_xent(z[:B], z[B:], self.temperature, self.queue.negatives().clone())
        if self.training:
            self.queue.push(z)  # after the loss: this batch's views are not their own negatives
        return {"loss": loss}
