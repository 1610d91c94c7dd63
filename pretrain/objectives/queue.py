"""A first-in first-out queue of past embeddings, used as extra negatives by the contrastive losses.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020: a queue decouples the
number of negatives from the batch, so a batch of 4 volumes still contrasts each anchor with hundreds of others.
The queue is a buffer of the objective, so DeepSpeed checkpoints it and a resumed run continues with it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.objectives.gather import gather_no_grad


class NegativeQueue(nn.Module):
    """``size`` unit vectors of width ``dim``; ``negatives()`` the filled part, ``push(z)`` enqueues every rank's
    rows (the same on all ranks, so the queues stay equal)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 0:
            raise ValueError(f"queue size must be >= 0, got {size}")
        self.size = size
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # rows written so far (≤ size)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next row to overwrite

    def negatives(self) -> torch.Tensor:
        """(n, dim) with n = the rows written so far, at most ``size``."""
        return self.keys[: int(self.filled)]

    @torch.no_grad()
    def push(self, z: torch.Tensor) -> None:
        """Enqueue the normalised rows of ``z`` (B, dim) from all ranks, overwriting the oldest."""
        if self.size == 0:
            return
        z_all, _ = gather_no_grad(F.normalize(z.detach().float(), dim=1))  # (W*B, dim)
        if not bool(torch.isfinite(z_all).all()):
            return  # a non-finite step is skipped by the trainer; its embeddings must not poison later steps
        z_all = z_all[-self.size :]
        rows = (int(self.ptr) + torch.arange(len(z_all), device=z_all.device)) % self.size
        self.keys[rows] = z_all.to(self.keys.dtype)
        self.ptr.fill_((int(self.ptr) + len(z_all)) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + len(z_all)))
