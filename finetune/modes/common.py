"""What both modes share: the inputs of one fold (device and precision: ``common.precision``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class FoldInputs:
    """One fold's data: indices into ``volumes`` (N, 1, D, H, W) and targets for each side."""

    volumes: torch.Tensor
    make_backbone: Callable[[], nn.Module]  # a fresh backbone with the init loaded
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    y: np.ndarray  # targets of all N rows (class index or float)
    kind: str  # "classification" or "regression"
    n_classes: int  # 0 for regression
    seed: int
    features_key: str  # identifies (backbone, init, preprocessing, images) for the feature cache
    cache_dir: str | None = None
    augment: bool = False  # light augmentation of training volumes (full fine-tuning)
    tb: object | None = None  # a RankZeroWriter, or None
    tb_prefix: str = ""
    fold: int = 0
    out_dir: str | None = None  # the cell's run directory: modes that keep weights write there
    on_fitted: Callable[[nn.Module], None] | None = None  # called with the trained model (best epoch restored)
