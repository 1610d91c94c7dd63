"""Linear probe: the frozen backbone's features, extracted once per (backbone, init, images) and cached on
disk, then a scikit-learn logistic regression / ridge whose regularisation is picked on the validation set."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from common.io import atomic_write, load_torch_file
from common.precision import autocast, resolve_device, resolve_precision
from finetune.linear import fit_select
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
    strengths = cfg.probe_c if inputs.kind == "classification" else cfg.probe_alpha
    val_out, test_out, chosen = fit_select(
        feats, inputs.y, inputs.kind, inputs.train_idx, inputs.val_idx, inputs.test_idx, strengths
    )
    return val_out, test_out, {"probe_param": chosen.get("C", chosen.get("alpha")), "val_score": chosen["val_score"]}
