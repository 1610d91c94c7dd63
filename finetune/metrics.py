"""Metrics (scikit-learn): classification and regression scores, brain-age bias correction, bootstrap 95 %
confidence intervals over subjects, and per-site results."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy.stats import pearsonr
from sklearn.linear_model import LinearRegression
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    mean_absolute_error,
    r2_score,
    recall_score,
    roc_auc_score,
    roc_curve,
    root_mean_squared_error,
)

log = logging.getLogger(__name__)

# The headline metric of each task kind, and whether larger is better (for early stopping and "best" marks).
PRIMARY = {"classification": ("roc_auc", True), "regression": ("mae", False)}


def classification_metrics(y: np.ndarray, prob: np.ndarray, threshold=None) -> dict[str, float]:
    """``y`` (n,) class indices, ``prob`` (n, n_classes) probabilities; binary: class 1 is positive, predicted
    where ``prob[:, 1] > threshold`` (a scalar or one per row) when given, else the argmax."""
    y = np.asarray(y)
    prob = np.asarray(prob, dtype=np.float64)
    pred = prob.argmax(axis=1) if threshold is None else (prob[:, 1] > threshold).astype(int)
    with warnings.catch_warnings():  # a small validation set can hold one class: scores are still defined
        warnings.simplefilter("ignore", UserWarning)
        return _classification_metrics(y, prob, pred)


def _classification_metrics(y: np.ndarray, prob: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    out = {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
    }
    both = len(np.unique(y)) > 1  # AUC is undefined on one class (a bootstrap resample can have one)
    if prob.shape[1] == 2:
        out["roc_auc"] = roc_auc_score(y, prob[:, 1]) if both else np.nan
        out["f1"] = f1_score(y, pred, zero_division=0)
        out["sensitivity"] = recall_score(y, pred, pos_label=1, zero_division=0)
        out["specificity"] = recall_score(y, pred, pos_label=0, zero_division=0)
    else:
        labels = np.arange(prob.shape[1])
        out["roc_auc"] = (
            roc_auc_score(y, prob, multi_class="ovr", labels=labels) if len(np.unique(y)) == prob.shape[1] else np.nan
        )
        out["f1"] = f1_score(y, pred, average="macro", zero_division=0)
    return {k: float(v) for k, v in out.items()}


def youden_threshold(y: np.ndarray, p1: np.ndarray) -> float:
    """The cut on ``p1`` (positive where ``p1 > cut``) that maximises sensitivity + specificity (Youden's J)
    on these labels, taken midway between neighbouring scores; ties go to the cut nearest 0.5. 0.5 when ``y``
    holds one class. Fit it on validation predictions: a network that has memorised its training subjects
    ranks test subjects well but its probabilities shift, so a fixed 0.5 can leave one class unpredicted."""
    y, p1 = np.asarray(y) == 1, np.asarray(p1, np.float64)
    if y.all() or not y.any():
        return 0.5
    fpr, tpr, at = roc_curve(y, p1, drop_intermediate=False)  # positive where p1 >= at[k]; at[0] = inf
    below = np.append(at[2:], at[-1] - 1e-6)  # the next lower score
    cuts = np.concatenate([[at[1]], (at[1:] + below) / 2])  # p1 > cuts[k]  <=>  p1 >= at[k]
    j = tpr - fpr
    best = np.flatnonzero(np.isclose(j, j.max()))
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


def fast_binary_metrics(y: np.ndarray, p1: np.ndarray, threshold=0.5) -> dict[str, float]:
    """The binary metrics of ``classification_metrics`` in plain NumPy (AUC by the rank-sum formula), for the
    thousands of bootstrap resamples where scikit-learn's input checks dominate; tests hold them equal."""
    y = np.asarray(y) == 1
    pred = np.asarray(p1) > threshold  # 0.5: argmax of (1 - p, p); a tie goes to class 0, as argmax does
    tp, tn = np.sum(pred & y), np.sum(~pred & ~y)
    pos, neg = np.sum(y), np.sum(~y)
    sens = tp / pos if pos else 0.0
    spec = tn / neg if neg else 0.0
    n_pred = np.sum(pred)
    f1 = 2 * tp / (pos + n_pred) if pos + n_pred else 0.0
    auc = np.nan
    if pos and neg:
        # mid-ranks of p1 (ties share their mean rank), as scipy's rankdata gives, without its input checks
        _, inverse, counts = np.unique(p1, return_inverse=True, return_counts=True)
        ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
        auc = (ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg)
    bal = (sens + spec) / 2 if pos and neg else (sens if pos else spec)
    return {
        "accuracy": float((tp + tn) / len(y)),
        "balanced_accuracy": float(bal),
        "roc_auc": float(auc),
        "f1": float(f1),
        "sensitivity": float(sens),
        "specificity": float(spec),
    }


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    r = pearsonr(y, pred).statistic if len(y) > 2 and np.std(pred) > 0 and np.std(y) > 0 else np.nan
    return {
        "mae": float(mean_absolute_error(y, pred)),
        "rmse": float(root_mean_squared_error(y, pred)),
        "pearson_r": float(r),
        "r2": float(r2_score(y, pred)) if len(y) > 1 else np.nan,
    }


class BiasCorrection:
    """Brain-age bias correction (de Lange & Cole 2020): fit ``pred = a * age + b`` on training/validation
    predictions, then ``corrected = (pred - b) / a``. Fit it on data the test set is not part of."""

    def fit(self, age: np.ndarray, pred: np.ndarray) -> BiasCorrection:
        reg = LinearRegression().fit(np.asarray(age, np.float64).reshape(-1, 1), np.asarray(pred, np.float64))
        self.slope, self.intercept = float(reg.coef_[0]), float(reg.intercept_)
        return self

    def apply(self, pred: np.ndarray) -> np.ndarray:
        return (np.asarray(pred, np.float64) - self.intercept) / self.slope


def bootstrap_ci(
    metrics: Callable[[np.ndarray], dict[str, float]],
    n: int,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of each entry of ``metrics(indices)``, resampling ``groups`` (subjects) with
    replacement; NaN bounds when too few resamples give a finite value (e.g. AUC on one-class resamples)."""
    rng = np.random.default_rng(seed)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    values: dict[str, list[float]] = {}
    for _ in range(n_boot if n else 0):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        with np.errstate(all="ignore"):
            for name, v in metrics(idx).items():
                values.setdefault(name, []).append(v)
    out = {}
    for name, vs in values.items():
        vs = np.asarray(vs, np.float64)
        vs = vs[np.isfinite(vs)]
        out[name] = (
            (float(np.quantile(vs, alpha / 2)), float(np.quantile(vs, 1 - alpha / 2)))
            if len(vs) >= 10
            else (np.nan, np.nan)
        )
    return out


def with_ci(value: float | None, lo: float | None = None, hi: float | None = None) -> str:
    """A metric and its 95 % CI as people read them, rounded to 3 decimals: ``0.812 [0.601, 0.950]`` (``–`` for a
    missing or non-finite value; the bracket only when both bounds are finite). CSV and JSON keep full precision."""
    if value is None or not np.isfinite(value):
        return "–"
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{value:.3f}"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def score_predictions(pred: pd.DataFrame, kind: str, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Metrics of a predictions table (columns ``y_true``, ``prob_*`` or ``y_pred``[, ``y_pred_corrected``],
    ``subject_id``; binary: optionally each row's decision ``threshold``), each with ``_lo`` / ``_hi``
    bootstrap CI bounds, resampling subjects."""
    subjects = pred["subject_id"].to_numpy()
    if kind == "classification":
        prob_cols = sorted(c for c in pred.columns if c.startswith("prob_"))
        y, prob = pred["y_true"].to_numpy(int), pred[prob_cols].to_numpy()
        cut = pred["threshold"].to_numpy(float) if "threshold" in pred and prob.shape[1] == 2 else None
        point = classification_metrics(y, prob, cut)
        if prob.shape[1] == 2:
            cut = np.full(len(y), 0.5) if cut is None else cut
            fn = lambda idx: fast_binary_metrics(y[idx], prob[idx, 1], cut[idx])
        else:
            fn = lambda idx: classification_metrics(y[idx], prob[idx])
    else:
        y, yp = pred["y_true"].to_numpy(float), pred["y_pred"].to_numpy(float)
        yc = pred["y_pred_corrected"].to_numpy(float) if "y_pred_corrected" in pred else None

        def fn(idx, exact=False):
            t, q = y[idx], yp[idx]
            if exact:
                out = regression_metrics(t, q)
            else:  # the same four in NumPy for the bootstrap
                err = q - t
                ss = np.sum((t - t.mean()) ** 2)
                out = {
                    "mae": np.mean(np.abs(err)),
                    "rmse": np.sqrt(np.mean(err**2)),
                    "pearson_r": np.corrcoef(t, q)[0, 1] if np.std(q) > 0 and np.std(t) > 0 else np.nan,
                    "r2": 1 - np.sum(err**2) / ss if ss > 0 else np.nan,
                }
            if yc is not None:
                out["mae_corrected"] = float(np.mean(np.abs(yc[idx] - t)))
            return out

        point = fn(np.arange(len(pred)), exact=True)
    out = dict(point)
    cis = bootstrap_ci(fn, len(pred), subjects, n_boot, seed)
    for name in list(out):
        out[f"{name}_lo"], out[f"{name}_hi"] = cis.get(name, (np.nan, np.nan))
    return out


def per_site(pred: pd.DataFrame, kind: str, column: str = "site") -> pd.DataFrame:
    """Point metrics per value of ``column`` (no CI), with the number of images ``n``. A site whose metrics
    cannot be computed keeps its row, with NaN metrics and the reason in ``error``: a reader of
    ``per_site.csv`` must see every site, not a table that silently lost one."""
    rows = []
    for site, part in pred.groupby(column):
        try:
            metrics = score_predictions(part, kind, n_boot=0)
            error = ""
        except ValueError as e:
            metrics, error = {}, f"{type(e).__name__}: {e}"
            log.warning("per-site metrics of %s=%s (%d rows) cannot be computed: %s", column, site, len(part), e)
        rows.append(
            {
                column: site,
                "n": len(part),
                **{k: v for k, v in metrics.items() if not k.endswith(("_lo", "_hi"))},
                "error": error,
            }
        )
    return pd.DataFrame(rows)
