"""MoCo v3: a query encoder predicts the keys of a momentum (EMA) encoder on the other view.

Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021: backbone +
3-layer projector + 2-layer predictor; the momentum encoder (backbone + projector) is an EMA of the online
one; symmetric InfoNCE ``ctr(q1, k2) + ctr(q2, k1)`` with keys gathered from all ranks, scaled by 2T; the
momentum rises from ``m`` to 1 over training by a half cosine. At small batches the keys may be extended by a
queue of past momentum keys (``queue_size``, MoCo v1/v2's queue; ``queue.py``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.objectives.base import Objective
from pretrain.objectives.gather import gather_no_grad
from pretrain.objectives.heads import mlp_head
from pretrain.objectives.queue import NegativeQueue


def moco_contrastive(
    q: torch.Tensor, k: torch.Tensor, temperature: float, negatives: torch.Tensor | None = None
) -> torch.Tensor:
    """InfoNCE of queries q (B, d) against all ranks' keys k (then the queued ``negatives`` (K, d)); the positive
    of query i is this rank's key i. Chance level (all similarities equal): 2T·ln(WB + K)."""
    q = F.normalize(q.float(), dim=1)
    k_all, rank = gather_no_grad(F.normalize(k.float(), dim=1))  # (W*B, d)
    if negatives is not None and len(negatives):
        k_all = torch.cat([k_all, negatives.to(k_all.dtype)])  # (W*B + K, d)
    logits = q @ k_all.T / temperature  # (B, W*B + K)
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


class MoCoV3(Objective):
    """Online backbone + projector + predictor, momentum backbone + projector (not trained by the optimizer)."""

    needs_views = True
    updates_in_place = True  # the momentum encoder's EMA

    def __init__(
        self,
        encoder: nn.Module,
        proj_hidden: int = 2048,
        proj_dim: int = 256,
        temperature: float = 0.2,
        momentum: float = 0.99,
        queue_size: int = 0,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.encoder = encoder
        self.projector = mlp_head(encoder.feature_dim, proj_hidden, proj_dim, num_layers=3, last_bn=True)
        self.predictor = mlp_head(proj_dim, proj_hidden, proj_dim, num_layers=2, last_bn=True)
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]:
            p.requires_grad = False
        self.temperature = temperature
        self.base_momentum = momentum
        self.queue = NegativeQueue(queue_size, proj_dim)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        B = batch["view1"].shape[0]
        views = torch.cat([batch["view1"], batch["view2"]], dim=0)  # (2B, 1, D, H, W)
        q = self.predictor(self.projector(self.encoder.forward_features(views)))  # (2B, d)
        with torch.no_grad():
            k = self.momentum_projector(self.momentum_encoder.forward_features(views))  # (2B, d)
        negatives = self.queue.negatives().clone()
        loss = moco_contrastive(q[:B], k[B:], self.temperature, negatives) + moco_contrastive(
            q[B:], k[:B], self.temperature, negatives
        )
        if self.training:
            self.queue.push(k)
        return {"loss": loss}

    def momentum_at(self, step: int, total_steps: int) -> float:
        """Half-cosine schedule from the base momentum (step 0) to 1 (last step)."""
        progress = min(1.0, step / max(1, total_steps))
        return 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update of the momentum encoder and projector after optimizer step ``step``."""
        m = self.momentum_at(step, total_steps)
        online = [*self.encoder.parameters(), *self.projector.parameters()]
        target = [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]
        torch._foreach_mul_(target, m)
        torch._foreach_add_(target, [p.detach() for p in online], alpha=1.0 - m)
