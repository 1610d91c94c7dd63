"""Linear probe: the frozen backbone's features, extracted once per (backbone, init, images) and cached on
disk, then a scikit-learn logistic regression / ridge whose L2 penalty (``train.probe_l2``) is picked on the
validation set. The probe is kept as a float64 head on the frozen backbone (``finetune.heads.linear_head``)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from common.io import atomic_write, load_torch_file
from common.precision import autocast, resolve_device, resolve_precision
from finetune.heads import FineTuneModel, linear_head
from finetune.linear import fit_linear
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


def cached_features(inputs: FoldInputs, batch_size: int, device: torch.device, precision: str) -> torch.Tensor:
    """Features of all N volumes in the resolved ``precision``, from the in-process cache, the disk cache, or the
    backbone (then cached). bf16 and fp32 features differ: each precision has its own entry."""
    key = hashlib.sha1(f"{inputs.features_key}|{precision}".encode()).hexdigest()[:20]
    path = Path(inputs.cache_dir) / f"features-{key}.pt" if inputs.cache_dir else None
    feats = _FEATURES.get(key)
    if feats is None and path is not None and path.is_file():
        feats = load_torch_file(path)
    if feats is None:
        feats = extract_features(inputs.make_backbone(), inputs.volumes, batch_size, device, precision)
        log.info("extracted %s features (%s)", tuple(feats.shape), key)
    if path is not None and not path.is_file():
        with atomic_write(path) as tmp:
            torch.save(feats, tmp)
    _FEATURES[key] = feats
    return feats


def fit_predict_linear(inputs: FoldInputs, cfg, optim=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit the probe on the training rows, choose its L2 penalty from ``cfg.probe_l2`` on validation, predict
    validation and test; ``inputs.on_fitted`` gets the frozen backbone with the probe as its head. ``optim`` is
    the modes' common signature (``finetune.modes.MODES``): a closed-form probe has no optimizer."""
    device = resolve_device(cfg.device, key="train.device")
    precision = resolve_precision(cfg.precision, device, key="train.precision")
    feats = cached_features(inputs, cfg.batch_size, device, precision).numpy().astype(np.float64)
    val_out, test_out, chosen, linear = fit_linear(
        feats, inputs.y, inputs.kind, inputs.train_idx, inputs.val_idx, inputs.test_idx, cfg.probe_l2
    )
    if inputs.on_fitted is not None:
        head = linear_head(linear, inputs.kind == "classification")
        inputs.on_fitted(FineTuneModel(inputs.make_backbone(), head.fc.out_features, head=head).eval())
    return val_out, test_out, {"probe_l2": chosen["l2"], "val_score": chosen["val_score"], "precision": precision}
