"""L2-penalised linear models whose strength is chosen on validation subjects: ridge for regression,
class-balanced logistic regression for classification. The linear probe and the classical voxel baseline both
fit them. A strength is one number for both, the L2 penalty λ: ridge's alpha = λ, logistic regression's C = 1/λ.

With fewer training subjects than features (thousands of voxels, hundreds of frozen features), the optimal
weights of an L2-penalised model lie in the span of the training rows: a component orthogonal to it changes no
training prediction and only adds to the penalty. So the model is fitted on the rows' coordinates in that span
(n columns, from an SVD of the standardised training rows) and predicts exactly what the fit on all features
would, at a small fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from common.errors import ConfigError
from finetune.metrics import fast_binary_metrics, regression_metrics


def estimator(kind: str, l2: float) -> Ridge | LogisticRegression:
    """The model of ``kind`` at L2 penalty ``l2``: ridge with alpha = λ, or class-balanced logistic regression with
    C = 1/λ."""
    if kind == "regression":
        return Ridge(alpha=l2)
    return LogisticRegression(C=1 / l2, class_weight="balanced", max_iter=3000)


def search_order(kind: str, l2: Sequence[float]) -> list[float]:
    """The penalties ``l2`` in the order they are tried, the first best kept on a tie: scikit-learn's own parameter
    ascending, so ridge from the weakest penalty up and logistic regression from the strongest down."""
    return sorted((float(v) for v in l2), reverse=kind != "regression")


def param_grid(kind: str, l2: Sequence[float]) -> dict[str, list[float]]:
    """``l2`` as a grid of ``estimator``'s own parameter, in ``search_order`` (for ``GridSearchCV``)."""
    order = search_order(kind, l2)
    return {"alpha": order} if kind == "regression" else {"C": [1 / v for v in order]}


def row_basis(x: np.ndarray, train: np.ndarray) -> np.ndarray | None:
    """An orthonormal basis (k, d) of the span of ``x``'s training rows; None when there are no more features
    than training rows (the features are kept as they are)."""
    if x.shape[1] <= len(train):
        return None
    _, s, vt = np.linalg.svd(x[train], full_matrices=False)
    keep = s > s[0] * 1e-10  # a zero direction (e.g. a constant voxel) carries nothing
    return vt[keep]


def row_space(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """``x`` (standardised on ``train``) in coordinates of the span of its training rows; unchanged when there
    are no more features than training rows."""
    basis = row_basis(x, train)
    return x if basis is None else x @ basis.T


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
    l2: Sequence[float],
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit on ``train`` at every L2 penalty of ``l2``, keep the best on ``val``; returns the validation and test
    outputs (probabilities (n, C) or predictions (n,)) and what was chosen (``l2``, ``val_score``, ``n_features``).

    One BLAS thread: these matrices are small, and threads that wait for each other are ~10× slower as soon as
    anything else (a data worker, PyTorch's own threads) wants the cores."""
    return fit_linear(x, y, kind, train, val, test, l2)[:3]


def fit_linear(x, y, kind, train, val, test, l2) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """``fit_select``'s outputs and choice, and the chosen model in feature space (``mean``, ``scale``, ``weight``,
    ``bias``, ``l2`` as ``fit_head`` gives them): what a head needs to reproduce its outputs."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_linear(x, y, kind, train, val, test, l2)


def _fit_linear(x, y, kind, train, val, test, l2) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    scaler = StandardScaler().fit(x[train])
    z = scaler.transform(x)
    basis = row_basis(z, train)
    xs = z if basis is None else z @ basis.T
    score, model, penalty, out_val = _select(xs, y, kind, train, val, l2)
    out_test = model.predict(xs[test]) if kind == "regression" else model.predict_proba(xs[test])
    weight = np.atleast_2d(model.coef_)  # (k, row-space coordinates) -> (k, d): the same decision values
    linear = {
        "mean": scaler.mean_,
        "scale": scaler.scale_,
        "weight": weight if basis is None else weight @ basis,
        "bias": np.atleast_1d(model.intercept_),
        "l2": penalty,
    }
    return out_val, out_test, {"l2": penalty, "val_score": float(score), "n_features": int(x.shape[1])}, linear


def _select(xs, y, kind, train, val, l2):
    """Fit on ``train`` at every penalty, keep the best on ``val``: (score, model, penalty, its val output)."""
    if not len(val):
        raise ConfigError(
            "no validation subjects to choose the linear model's L2 penalty on; set protocol.val_fraction > 0"
        )
    best = None
    for penalty in search_order(kind, l2):
        model = estimator(kind, penalty).fit(xs[train], y[train])
        out_val = model.predict(xs[val]) if kind == "regression" else model.predict_proba(xs[val])
        score = validation_score(kind, y[val], out_val)
        if best is None or score > best[0]:
            best = (score, model, penalty, out_val)
    return best


def fit_head(
    x: np.ndarray,
    y: np.ndarray,
    kind: str,
    train: np.ndarray,
    val: np.ndarray,
    l2: Sequence[float],
) -> dict:
    """The probe as a head's starting point (LP-FT): the model of ``fit_select`` fitted on ``x`` standardised on
    its ``train`` rows, penalty chosen from ``l2`` on ``val``, returned in feature space as ``mean``, ``scale``
    (the standardisation, (d,)), ``weight`` (k, d) and ``bias`` (k,) such that ``((x - mean) / scale) @ weight.T +
    bias`` are its decision values (k = 1 for ridge and binary logistic regression) and ``l2``, the penalty."""
    with threadpool_limits(limits=1, user_api="blas"):
        scaler = StandardScaler().fit(x[train])
        _, model, penalty, _ = _select(scaler.transform(x), y, kind, train, val, l2)
    return {
        "mean": scaler.mean_,
        "scale": scaler.scale_,
        "weight": np.atleast_2d(model.coef_),
        "bias": np.atleast_1d(model.intercept_),
        "l2": penalty,
    }
