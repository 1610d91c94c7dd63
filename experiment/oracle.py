"""The oracle ceiling of a generated cohort: what a perfect volumetric pipeline reaches on it.

A synthetic cohort's manifest holds the true volumes of its label maps (the ``*_ml`` columns,
``synth.regions.label_volumes``). A linear model on those volumes, each as a fraction of the intracranial volume
(ICV = brain + CSF + ventricles, as ``synth.calibrate.with_icv``), with age and sex as covariates for a diagnosis,
is what a segmentation without error followed by the usual volumetric analysis reaches: a class-balanced logistic
regression (ROC-AUC) or a ridge (MAE in years), both at L2 penalty ``ORACLE_L2`` (``finetune.linear.estimator``),
cross-validated over ``ORACLE_FOLDS`` stratified, subject-grouped folds for each of ``ORACLE_SEEDS``. The value is
the mean over seeds of the pooled out-of-fold metric; its 95 % CI a bootstrap over subjects (the same resample for
every seed). Only volumes and covariates enter: the manifest's effect and scanner columns, which carry the label
by construction, do not.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.errors import DataError
from finetune.linear import estimator, validation_score
from finetune.metrics import PRIMARY, bootstrap_ci
from finetune.tasks import get_task, label_rows

ORACLE_FOLDS = 5
ORACLE_SEEDS = (0, 1, 2)  # fold shuffles; the ceiling is their mean
ORACLE_L2 = 1.0  # one fixed penalty: about ten standardised features on hundreds of subjects need little shrinkage
ICV_PARTS = ("brain_ml", "csf_ml", "ventricle_ml")  # their sum is the ICV (synth.calibrate.with_icv)
NOT_REGIONS = ("icv_ml", "native_icv_ml")  # volume columns that are the ICV itself, not a region
AGE_BINS = 5  # brain age: folds stratified on age quintiles


def volume_fractions(frame: pd.DataFrame, source: str = "manifest") -> pd.DataFrame:
    """Every region's ``*_ml`` column of ``frame`` divided by the ICV (columns keep their names)."""
    missing = [c for c in ICV_PARTS if c not in frame.columns]
    if missing:
        raise DataError(
            source, f"no true volumes {missing}: the oracle needs a cohort written by `python -m synth cohort`"
        )
    icv = frame[list(ICV_PARTS)].sum(axis=1)
    regions = [c for c in frame.columns if c.endswith("_ml") and c not in NOT_REGIONS]
    return frame[regions].div(icv, axis=0)


def _features(frame: pd.DataFrame, classification: bool, source: str) -> pd.DataFrame:
    x = volume_fractions(frame, source)
    if classification:  # a diagnosis is read with age and sex as covariates; brain age has age as its target
        x = x.assign(age=frame["age"].astype(float), male=frame["sex"].astype(str).str.upper().str.startswith("M"))
    return x.astype(float)


def _strata(y: np.ndarray, classification: bool) -> np.ndarray:
    return y if classification else pd.qcut(y, AGE_BINS, labels=False, duplicates="drop")


def oracle_ceiling(frame: pd.DataFrame, task: str, n_boot: int = 1000, seed: int = 0, source: str = "manifest") -> dict:
    """The ceiling of ``task`` on a cohort's manifest rows ``frame``: ``metric`` (``roc_auc`` | ``mae``),
    ``value``, ``ci_low``, ``ci_high``, ``per_seed``, ``n_subjects``, ``features``; ``source`` names the manifest
    in errors."""
    kind = get_task(task).kind
    labelled = label_rows(get_task(task), frame, source)
    rows, y = labelled.df, labelled.y
    classification = kind == "classification"
    x = _features(rows, classification, source)
    groups = rows["subject_id"].astype(str).to_numpy()
    strata = _strata(y, classification)
    folds = min(ORACLE_FOLDS, int(np.bincount(np.unique(strata, return_inverse=True)[1]).min()))
    if folds < 2:
        raise DataError(source, f"task {task}: too few subjects per class (or age band) for a cross-validated oracle")
    outputs = []
    for s in ORACLE_SEEDS:
        model = make_pipeline(StandardScaler(), estimator(kind, ORACLE_L2))
        cv = StratifiedGroupKFold(folds, shuffle=True, random_state=s).split(x, strata, groups)
        method = "predict_proba" if classification else "predict"
        outputs.append(cross_val_predict(model, x.to_numpy(), y, cv=list(cv), method=method))
    sign = 1.0 if classification else -1.0  # validation_score is larger-is-better: minus the MAE

    def metric(idx: np.ndarray) -> dict[str, float]:
        return {"value": float(np.mean([sign * validation_score(kind, y[idx], out[idx]) for out in outputs]))}

    low, high = bootstrap_ci(metric, len(y), groups, n_boot, seed).get("value", (np.nan, np.nan))
    return {
        "task": task,
        "metric": PRIMARY[kind][0],
        "value": metric(np.arange(len(y)))["value"],
        "ci_low": low,
        "ci_high": high,
        "per_seed": [sign * validation_score(kind, y, out) for out in outputs],
        "n_subjects": int(len(np.unique(groups))),
        "features": list(x.columns),
        "folds": folds,
    }
