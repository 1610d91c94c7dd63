"""LP-FT (train.head_init=probe): before any training step the model predicts what the linear probe of its
frozen features predicts, with either head normalisation, for classification and regression."""

import numpy as np
import pytest
import torch

from common.models import create_backbone
from finetune.heads import FineTuneModel
from finetune.linear import fit_head
from finetune.modes.common import FoldInputs
from finetune.modes.full import init_head_from_probe


def inputs(kind: str) -> FoldInputs:
    g = torch.Generator().manual_seed(0)
    volumes = torch.rand(40, 1, 16, 16, 16, generator=g)
    volumes[:20] += 0.3 * torch.linspace(0, 1, 16)  # a planted difference the features can carry
    y = np.r_[np.ones(20), np.zeros(20)]
    y = y.astype(np.int64) if kind == "classification" else y + np.random.default_rng(0).normal(0, 0.1, 40)
    idx = np.random.default_rng(1).permutation(40)
    return FoldInputs(
        volumes=volumes,
        make_backbone=lambda: create_backbone("resnet18", img_size=16, widen_factor=0.25),
        train_idx=idx[:24],
        val_idx=idx[24:32],
        test_idx=idx[32:],
        y=y,
        kind=kind,
        n_classes=2 if kind == "classification" else 0,
        seed=0,
        features_key="test",
    )


@pytest.mark.parametrize("kind", ["classification", "regression"])
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_the_initial_head_is_the_probe(kind, norm):
    torch.manual_seed(0)
    fold = inputs(kind)
    out_dim = 2 if kind == "classification" else 1
    model = FineTuneModel(fold.make_backbone(), out_dim, norm=norm)
    init_head_from_probe(model, fold, fold.y, batch_size=8, device=torch.device("cpu"), precision="fp32")
    model.eval()
    with torch.no_grad():
        feats = model.backbone.forward_features(fold.volumes).double().numpy()
        out = model(fold.volumes).double().numpy()
    rows = np.concatenate([fold.train_idx, fold.val_idx])
    n = len(fold.train_idx)
    fit = fit_head(feats[rows], fold.y[rows], kind, np.arange(n), np.arange(n, len(rows)))
    decision = ((feats - fit["mean"]) / fit["scale"]) @ fit["weight"].T + fit["bias"]  # (N, 1)
    if kind == "classification":
        assert np.allclose(out[:, 1] - out[:, 0], decision[:, 0], atol=1e-3)
        auc_like = np.mean(decision[fold.y == 1, 0][:, None] > decision[fold.y == 0, 0][None, :])
        assert auc_like > 0.8  # the probe separates the planted classes, so the head starts informed
    else:
        assert np.allclose(out[:, 0], decision[:, 0], atol=1e-3)
        assert np.corrcoef(out[:, 0], fold.y)[0, 1] > 0.8
