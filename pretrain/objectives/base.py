"""What every objective declares to the trainer and the data pipeline, instead of being probed."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn


class Objective(nn.Module):
    """A self-supervised objective around ``self.encoder`` (what gets exported).

    ``forward(batch)`` returns a dict with ``"loss"``. The class attributes say what the objective needs; the
    hooks are no-ops unless an objective has something to do.
    """

    needs_views: ClassVar[bool] = False  # batches hold two augmented views ("view1", "view2"), not "image"
    image_tag: ClassVar[str | None] = None  # TensorBoard prefix of ``images()``; None: it logs no images
    updates_in_place: ClassVar[bool] = False  # after_step changes weights outside the optimizer (not under ZeRO-3)
    needs_covariates: ClassVar[tuple[str, ...]] = ()  # per-item covariates the batch must carry, e.g. ("age",)

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after optimizer step ``step`` (MoCo's momentum update)."""

    def images(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named (1, H, W) images in [0, 1] for TensorBoard under ``image_tag``."""
        return {}
