"""The classical baseline every cell is compared with: a linear model on down-sampled, standardised voxels of
the same inputs, on the same folds (the comparison of Wen et al., ClinicaDL 2020: CNN vs linear SVM on grey-matter
maps). Ridge for regression (brain age), logistic regression (class-balanced) for classification; the L2 penalty
is chosen from ``L2[kind]`` on the fold's validation subjects, the model fitted on its training subjects
(``finetune.linear``).

It depends only on the images, the labels and the fold, not on the cell's backbone or init: the cells of a grid
that share them share one fit (kept in this process, keyed by content).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from finetune.linear import fit_select

# L2 penalties λ by task kind (ridge alpha = λ, logistic C = 1/λ): thousands of voxels need stronger penalties than
# the linear probe's few hundred features (train.probe_l2); 13 of the quickstart's 30 folds choose 1e4 or more
L2 = {"regression": tuple(np.logspace(-1, 5, 7)), "classification": tuple(np.logspace(0, 5, 6))}
_FITS: dict[str, tuple[np.ndarray, np.ndarray, dict]] = {}


def voxel_features(volumes: torch.Tensor, pool: int) -> np.ndarray:
    """(N, 1, D, H, W) -> (N, F) float64: average-pooled by ``pool`` per axis, flattened."""
    x = F.avg_pool3d(volumes.float(), pool, ceil_mode=True) if pool > 1 else volumes.float()
    return x.flatten(1).numpy().astype(np.float64)


def fit_predict(
    x: np.ndarray, y: np.ndarray, kind: str, train: np.ndarray, val: np.ndarray, test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The classical model of one fold: validation and test outputs and what was chosen (``l2``, ``val_score``,
    ``n_features``). A fold seen before (same voxels, labels and rows) is not refitted."""
    digest = hashlib.sha1(kind.encode())
    for part in (x, y, train, val, test):
        digest.update(np.ascontiguousarray(part).tobytes())
    key = digest.hexdigest()
    if key not in _FITS:
        _FITS[key] = fit_select(x, y, kind, train, val, test, L2[kind])
    val_out, test_out, chosen = _FITS[key]
    return val_out.copy(), test_out.copy(), dict(chosen)
