"""y-aware contrastive learning: views of subjects with similar covariates (age) attract, weighted by a kernel.

Dufumier et al., "Contrastive Learning with Continuous Proxy Meta-Data for 3D MRI Classification", MICCAI 2021:
InfoNCE in which every other view j of the global batch is a positive of anchor i in proportion to
``w(y_i, y_j) = exp(-(y_i - y_j)² / (2σ²))`` (σ in the covariate's units, years for age), normalised over j:

    L_i = -Σ_{j ≠ i} w_ij / Σ_{k ≠ i} w_ik · log( exp(s_ij / T) / Σ_{k ≠ i} exp(s_ik / T) )

The two views of one subject have equal y, so σ → 0 gives SimCLR's NT-Xent (distinct ages). Backbone and
projection head as in SimCLR; the covariate comes with the batch (``needs_covariates``). A subject without a label
(y NaN: weak labels, ``pretrain/corpora/weak_labels.py``) has its own other view as its only positive, SimCLR's
term, and is no labelled anchor's positive: with no label in the batch the loss is NT-Xent.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.objectives.gather import gather_no_grad
from pretrain.objectives.simclr import SimCLR, batch_logits


def kernel_weights(y_anchor: torch.Tensor, y_all: torch.Tensor, sigma: float) -> torch.Tensor:
    """RBF kernel (A,), (N,) -> (A, N): ``exp(-(y_a - y_n)² / (2σ²))``."""
    diff = y_anchor.float()[:, None] - y_all.float()[None, :]
    return torch.exp(-(diff**2) / (2 * sigma**2))


def yaware_nce(z1: torch.Tensor, z2: torch.Tensor, y: torch.Tensor, temperature: float, sigma: float) -> torch.Tensor:
    """The y-aware InfoNCE of paired embeddings z1, z2 (B, d) with covariate y (B,; NaN: no label), over the
    global batch. Chance level (all similarities equal): ln(2WB − 1), as NT-Xent's."""
    logits, self_idx, positive = batch_logits(z1, z2, temperature)  # (2B, 2WB), own column at -inf
    y_all, _ = gather_no_grad(y.float().reshape(-1, 1))  # (W*B, 1)
    y_all = y_all.reshape(-1)
    weights = kernel_weights(torch.cat([y, y]), torch.cat([y_all, y_all]), sigma)  # (2B, 2WB), NaN: unlabelled
    # a pair with an unlabelled side weighs 0; a view's own other view always 1 (SimCLR's positive)
    weights = weights.nan_to_num(0.0).masked_fill(F.one_hot(positive, logits.shape[1]).bool(), 1.0)
    own = F.one_hot(self_idx, logits.shape[1]).bool()
    weights = weights.masked_fill(own, 0.0)
    weights = weights / weights.sum(dim=1, keepdim=True)  # ≥ the other view's weight 1: never zero
    log_prob = F.log_softmax(logits, dim=1).masked_fill(own, 0.0)  # -inf · 0 would be NaN
    return -(weights * log_prob).sum(dim=1).mean()


class YAwareContrastive(SimCLR):
    """SimCLR's backbone + projection MLP trained by the y-aware loss; ``forward({"view1", "view2", "age"})``."""

    needs_covariates = ("age",)

    def __init__(
        self,
        encoder: nn.Module,
        proj_hidden: int = 2048,
        proj_dim: int = 256,
        temperature: float = 0.2,
        sigma: float = 5.0,
    ):
        super().__init__(encoder, proj_hidden, proj_dim, temperature)
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma = sigma

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        B = batch["view1"].shape[0]
        views = torch.cat([batch["view1"], batch["view2"]], dim=0)  # (2B, 1, D, H, W): one pass, shared BN
        z = self.projector(self.encoder.forward_features(views))  # (2B, proj_dim)
        age = batch["age"].to(z.device)  # (B,)
        return {"loss": yaware_nce(z[:B], z[B:], age, self.temperature, self.sigma)}
