"""L2-penalised linear models whose strength is chosen on validation subjects: ridge for regression,
class-balanced logistic regression for classification. The linear probe and the classical voxel baseline both
fit them.

With fewer training subjects than features (thousands of voxels, hundreds of frozen features), the optimal
weights of an L2-penalised model lie in the span of the training rows: a component orthogonal to it changes no
training prediction and only adds to the penalty. So the model is fitted on the rows' coordinates in that span
(n columns, from an SVD of the standardised training rows) and predicts exactly what the fit on all features
would, at a small fraction of the cost.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from finetune.metrics import fast_binary_metrics, regression_metrics

RIDGE_ALPHAS = tuple(np.logspace(-1, 5, 7))  # ridge strengths (standardised features)
LOGISTIC_CS = tuple(np.logspace(-5, 0, 6))  # inverse logistic-regression strengths


def row_space(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """``x`` (standardised on ``train``) in coordinates of the span of its training rows; unchanged when there
    are no more features than training rows."""
    if x.shape[1] <= len(train):
        return x
    _, s, vt = np.linalg.svd(x[train], full_matrices=False)
    keep = s > s[0] * 1e-10  # a zero direction (e.g. a constant voxel) carries nothing
    return x @ vt[keep].T


def standardised_row_space(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """``x`` standardised on its ``train`` rows, in coordinates of their span: what an L2 model fitted on any of
    those rows sees exactly as it would see all features."""
    return row_space(StandardScaler().fit(x[train]).transform(x), train)


def validation_score(kind: str, y: np.ndarray, output: np.ndarray) -> float:
    """Larger is better: ROC-AUC (accuracy where one class is present), or minus the MAE."""
    if kind == "regression":
        return -regression_metrics(y, output)["mae"]
    if output.shape[1] == 2:
        m = fast_binary_metrics(y, output[:, 1])
        return m["roc_auc"] if np.isfinite(m["roc_auc"]) else m["accuracy"]
    if len(np.unique(y)) == output.shape[1]:
        return float(roc_auc_score(y, output, multi_class="ovr", labels=np.arange(output.shape[1])))
    return float(np.mean(output.argmax(1) == y))


def fit_select(
    x: np.ndarray,
    y: np.ndarray,
    kind: str,
    train: np.ndarray,
    val: np.ndarray,
    test: np.ndarray,
    strengths: tuple[float, ...] | list[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit on ``train`` for every strength (ridge alpha / logistic C), keep the best on ``val``; returns the
    validation and test outputs (probabilities (n, C) or predictions (n,)) and what was chosen.

    One BLAS thread: these matrices are small, and threads that wait for each other are ~10× slower as soon as
    anything else (a data worker, PyTorch's own threads) wants the cores."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_select(x, y, kind, train, val, test, strengths)


def _fit_select(x, y, kind, train, val, test, strengths) -> tuple[np.ndarray, np.ndarray, dict]:
    xs = standardised_row_space(x, train)
    score, model, strength, out_val = _select(xs, y, kind, train, val, strengths)
    out_test = model.predict(xs[test]) if kind == "regression" else model.predict_proba(xs[test])
    name = "alpha" if kind == "regression" else "C"
    return out_val, out_test, {name: strength, "val_score": float(score), "n_features": int(x.shape[1])}


def _select(xs, y, kind, train, val, strengths):
    """Fit on ``train`` for every strength, keep the best on ``val``: (score, model, strength, its val output)."""
    if strengths is None:
        strengths = RIDGE_ALPHAS if kind == "regression" else LOGISTIC_CS
    best = None
    for strength in strengths:
        if kind == "regression":
            model = Ridge(alpha=strength).fit(xs[train], y[train])
            out_val = model.predict(xs[val])
        else:
            model = LogisticRegression(C=strength, class_weight="balanced", max_iter=3000)
            out_val = model.fit(xs[train], y[train]).predict_proba(xs[val])
        score = validation_score(kind, y[val], out_val) if len(val) else 0.0
        if best is None or score > best[0]:
            best = (score, model, float(strength), out_val)
    return best


def fit_head(
    x: np.ndarray,
    y: np.ndarray,
    kind: str,
    train: np.ndarray,
    val: np.ndarray,
    strengths: tuple[float, ...] | list[float] | None = None,
) -> dict:
    """The probe as a head's starting point (LP-FT): the model of ``fit_select`` fitted on ``x`` standardised on
    its ``train`` rows, strength chosen on ``val``, returned in feature space as ``mean``, ``scale`` (the
    standardisation, (d,)), ``weight`` (k, d) and ``bias`` (k,) such that ``((x - mean) / scale) @ weight.T +
    bias`` are its decision values (k = 1 for ridge and binary logistic regression) and ``strength``."""
    with threadpool_limits(limits=1, user_api="blas"):
        scaler = StandardScaler().fit(x[train])
        _, model, strength, _ = _select(scaler.transform(x), y, kind, train, val, strengths)
    return {
        "mean": scaler.mean_,
        "scale": scaler.scale_,
        "weight": np.atleast_2d(model.coef_),
        "bias": np.atleast_1d(model.intercept_),
        "strength": strength,
    }
