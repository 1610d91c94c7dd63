"""LP-FT (train.head_init=probe): before any training step the model predicts what the linear probe of its
frozen features predicts, with either head normalisation, for classification and regression."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from common.models import create_backbone
from finetune.heads import FineTuneModel
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


GRID = [0.1, 1.0, 10.0, 100.0, 1000.0]  # L2 penalties: ridge alpha = λ, logistic C = 1/λ


def oracle(feats: np.ndarray, y: np.ndarray, fold: FoldInputs, kind: str) -> tuple[float, np.ndarray]:
    """The probe fitted directly with scikit-learn on features standardised on the training rows: each penalty of
    ``GRID`` scored on the validation rows (ROC-AUC or minus the MAE, the first best kept, alpha and C each
    ascending); returns that penalty and the decision values of all rows (N,)."""
    tr, va = fold.train_idx, fold.val_idx
    z = StandardScaler().fit(feats[tr]).transform(feats)  # a constant feature (a dead ReLU) is left at 0
    fitted = []
    for l2 in GRID if kind == "regression" else GRID[::-1]:
        if kind == "regression":
            decision = Ridge(alpha=l2).fit(z[tr], y[tr]).predict(z)
            score = -np.mean(np.abs(decision[va] - y[va]))
        else:
            model = LogisticRegression(C=1 / l2, class_weight="balanced", max_iter=3000).fit(z[tr], y[tr])
            decision = model.decision_function(z)
            score = roc_auc_score(y[va], decision[va])
        fitted.append((score, l2, decision))
    best = int(np.argmax([score for score, _, _ in fitted]))
    return fitted[best][1], fitted[best][2]


@pytest.mark.parametrize("kind", ["classification", "regression"])
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_the_initial_head_is_the_probe(kind, norm):
    torch.manual_seed(0)
    fold = inputs(kind)
    out_dim = 2 if kind == "classification" else 1
    model = FineTuneModel(fold.make_backbone(), out_dim, norm=norm)
    l2 = init_head_from_probe(model, fold, fold.y, 8, torch.device("cpu"), "fp32", GRID)
    model.eval()
    with torch.no_grad():
        feats = model.backbone.forward_features(fold.volumes).double().numpy()
        out = model(fold.volumes).double().numpy()
    expected_l2, decision = oracle(feats, fold.y, fold, kind)
    assert l2 == expected_l2
    tol = 1e-3 * np.abs(decision).max()  # a strongly penalised logistic model's decision values are ~1e-3
    if kind == "classification":
        np.testing.assert_allclose(out[:, 1] - out[:, 0], decision, rtol=0, atol=tol)
        auc_like = np.mean(decision[fold.y == 1][:, None] > decision[fold.y == 0][None, :])
        assert auc_like > 0.8  # the probe separates the planted classes, so the head starts informed
    else:
        np.testing.assert_allclose(out[:, 0], decision, rtol=0, atol=tol)
        assert np.corrcoef(out[:, 0], fold.y)[0, 1] > 0.8
