"""Linear probe: the frozen backbone's features, extracted once per (backbone, init, images) and cached on
disk, then a scikit-learn logistic regression / ridge whose regularisation is picked on the validation set."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.io import atomic_write, load_torch_file
from common.precision import autocast, resolve_device, resolve_precision
from finetune.metrics import classification_metrics, regression_metrics
from finetune.modes.common import FoldInputs

log = logging.getLogger(__name__)
_FEATURES: dict[str, torch.Tensor] = {}  # in-process cache: folds and fractions of one cell share features


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module, volumes: torch.Tensor, batch_size: int, device: torch.device, precision: str
) -> torch.Tensor:
    """(N, 1, D, H, W) -> (N, feature_dim) float32 with the backbone in eval mode."""
    backbone = backbone.to(device).eval()
    out = []
    for start in range(0, len(volumes), batch_size):
        x = volumes[start : start + batch_size].to(device)
        with autocast(device, precision):
            out.append(backbone.forward_features(x).float().cpu())
    return torch.cat(out)


def cached_features(inputs: FoldInputs, batch_size: int, device_name: str, precision_setting: str) -> torch.Tensor:
    """Features of all N volumes, from the in-process cache, the disk cache, or the backbone (then cached)."""
    key = hashlib.sha1(inputs.features_key.encode()).hexdigest()[:20]
    path = Path(inputs.cache_dir) / f"features-{key}.pt" if inputs.cache_dir else None
    feats = _FEATURES.get(key)
    if feats is None and path is not None and path.is_file():
        feats = load_torch_file(path)
    if feats is None:
        device = resolve_device(device_name, key="train.device")
        precision = resolve_precision(precision_setting, device, key="train.precision")
        feats = extract_features(inputs.make_backbone(), inputs.volumes, batch_size, device, precision)
        log.info("extracted %s features (%s)", tuple(feats.shape), key)
    if path is not None and not path.is_file():
        with atomic_write(path) as tmp:
            torch.save(feats, tmp)
    _FEATURES[key] = feats
    return feats


def fit_predict_linear(inputs: FoldInputs, cfg) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit the probe on the training rows, choose C / alpha on validation, predict validation and test."""
    feats = cached_features(inputs, cfg.batch_size, cfg.device, cfg.precision).numpy().astype(np.float64)
    X = lambda idx: feats[idx]
    y = inputs.y
    tr, va, te = inputs.train_idx, inputs.val_idx, inputs.test_idx
    best, best_score, best_param = None, -np.inf, None
    if inputs.kind == "classification":
        grid = [
            make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=3000))
            for c in cfg.probe_c
        ]
        params = cfg.probe_c
    else:
        grid = [make_pipeline(StandardScaler(), Ridge(alpha=a)) for a in cfg.probe_alpha]
        params = cfg.probe_alpha
    for model, param in zip(grid, params):
        model.fit(X(tr), y[tr])
        score = _val_score(model, X(va), y[va], inputs) if len(va) else 0.0
        if score > best_score:
            best, best_score, best_param = model, score, param
    out = (
        (lambda idx: best.predict_proba(X(idx)))
        if inputs.kind == "classification"
        else (lambda idx: best.predict(X(idx)))
    )
    return out(va), out(te), {"probe_param": best_param, "val_score": float(best_score)}


def _val_score(model, Xv: np.ndarray, yv: np.ndarray, inputs: FoldInputs) -> float:
    """Larger is better: validation AUC (accuracy if one class), or minus the validation MAE."""
    if inputs.kind == "classification":
        m = classification_metrics(yv, model.predict_proba(Xv))
        return m["roc_auc"] if np.isfinite(m["roc_auc"]) else m["accuracy"]
    return -regression_metrics(yv, model.predict(Xv))["mae"]
