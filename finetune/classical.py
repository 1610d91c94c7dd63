"""The classical baseline every cell is compared with: a linear model on down-sampled, standardised voxels of
the same inputs, on the same folds (the comparison of Wen et al., ClinicaDL 2020: CNN vs linear SVM on grey-matter
maps). Ridge for regression (brain age), logistic regression (class-balanced) for classification; the
regularisation strength is chosen on the fold's validation subjects, the model fitted on its training subjects.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

from finetune.metrics import PRIMARY, classification_metrics, regression_metrics

ALPHAS = np.logspace(-1, 5, 7)  # ridge strengths tried (standardised voxels: thousands of features)
CS = np.logspace(-5, 0, 6)  # inverse logistic-regression strengths tried


def voxel_features(volumes: torch.Tensor, pool: int) -> np.ndarray:
    """(N, 1, D, H, W) -> (N, F) float64: average-pooled by ``pool`` per axis, flattened."""
    x = F.avg_pool3d(volumes.float(), pool, ceil_mode=True) if pool > 1 else volumes.float()
    return x.flatten(1).numpy().astype(np.float64)


def _score(kind: str, y: np.ndarray, output: np.ndarray) -> float:
    """The primary metric, signed so that larger is better."""
    primary, higher = PRIMARY[kind]
    m = classification_metrics(y, output) if kind == "classification" else regression_metrics(y, output)
    value = m[primary]
    return -np.inf if not np.isfinite(value) else (value if higher else -value)


def fit_predict(
    x: np.ndarray,
    y: np.ndarray,
    kind: str,
    train: np.ndarray,
    val: np.ndarray,
    test: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit on ``train`` for every strength, keep the one best on ``val`` by the primary metric; returns the
    validation and test outputs (probabilities (n, C) or predictions (n,)) and what was chosen."""
    scaler = StandardScaler().fit(x[train])
    xs = scaler.transform(x)
    best = None
    for strength in ALPHAS if kind == "regression" else CS:
        if kind == "regression":
            model = Ridge(alpha=strength).fit(xs[train], y[train])
            out_val, out_test = model.predict(xs[val]), model.predict(xs[test])
        else:
            model = LogisticRegression(C=strength, class_weight="balanced", max_iter=2000)
            model.fit(xs[train], y[train])
            out_val, out_test = model.predict_proba(xs[val]), model.predict_proba(xs[test])
        score = _score(kind, y[val], out_val) if len(val) else 0.0
        if best is None or score > best[0]:
            best = (score, out_val, out_test, float(strength))
    name = "alpha" if kind == "regression" else "C"
    return best[1], best[2], {name: best[3], "n_features": int(x.shape[1])}
