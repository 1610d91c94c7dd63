"""What a checkpoint's frozen features know: cross-validated linear fits of a manifest's covariates.

``python -m finetune probe --init SPEC --manifest M`` reads the manifest's images through fine-tuning's own
pipeline (``finetune.run.load_task_data``'s reader and preprocessing), extracts the frozen pooled features of the
init (``finetune.modes.linear_probe.extract_features``), of the same architecture from random weights, and the
classical baseline's pooled voxels (``finetune.classical.voxel_features``), and fits each covariate on each:
ridge for a numeric column (age), class-balanced logistic regression for a text one (sex, diagnosis, site).
Outer folds are subject-level and seeded (``GroupKFold`` with shuffling for a continuous covariate; for a
categorical one ``stratified_group_folds``, which stratifies the subjects by class, and each class needs
``min_class_subjects(folds)`` subjects, so that every outer and inner training set holds every class); the features
are standardised on the outer training rows and the regularisation is chosen by an inner subject-level CV on those
rows only. Metrics are of the pooled out-of-fold predictions: Pearson r and MAE for continuous covariates, balanced
accuracy and ROC-AUC for categorical ones. A covariate that is absent, has empty or non-finite cells, one value or a
class too small for the folds, and ``--folds`` below 2 or above the subjects, are refused before any feature is
extracted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedKFold
from threadpoolctl import threadpool_limits

from common.data import read_manifest
from common.distributed import seed_everything
from common.errors import ConfigError, DataError
from common.io import atomic_write_text
from common.precision import resolve_device, resolve_precision
from common.weights import load_backbone
from finetune import classical
from finetune.config import RunConfig, validate
from finetune.data import load_volumes
from finetune.linear import standardised_row_space
from finetune.metrics import classification_metrics, regression_metrics
from finetune.modes.linear_probe import extract_features
from finetune.parity import check_parity
from finetune.run import build_backbone, check_init_path

log = logging.getLogger(__name__)
COVARIATES = ("age", "sex", "diagnosis", "site")  # probed by default, where the manifest has them
ALPHAS = np.logspace(-2, 4, 7)  # ridge strengths of the inner CV
CS = np.logspace(-4, 0, 5)  # inverse logistic strengths of the inner CV
METRICS = {"continuous": ("pearson_r", "mae"), "categorical": ("balanced_accuracy", "roc_auc")}


def min_class_subjects(folds: int) -> int:
    """Subjects a class needs for ``folds`` stratified outer folds: one per fold, and at least two on every outer
    training side for the inner CV (so 4 with 2 folds)."""
    return 4 if folds == 2 else folds


def _csv_lines(mask: np.ndarray) -> str:
    """CSV line numbers of the rows in ``mask`` (the header is line 1), the first few."""
    rows = np.flatnonzero(mask)
    return ", ".join(str(i + 2) for i in rows[:5]) + (", ..." if len(rows) > 5 else "") + f" ({len(rows)} rows)"


def covariate_targets(
    df: pd.DataFrame, names: tuple[str, ...], manifest: str | Path, folds: int = 5
) -> dict[str, np.ndarray]:
    """Each covariate of ``names``: a numeric column (continuous) as float, a text one (categorical) as class
    indices. A column that is absent, has empty or non-finite cells, has one value, or (text) has a class of
    fewer than ``min_class_subjects(folds)`` subjects is a ``DataError`` naming it."""
    out = {}
    for name in names:
        if name not in df.columns:
            raise DataError(manifest, f"no column {name!r} to probe; the columns are {', '.join(df.columns)}")
        values = df[name]
        if values.isna().any():
            rows = _csv_lines(values.isna().to_numpy())
            raise DataError(manifest, f"column {name!r} has empty cells (CSV lines {rows}); fill or drop those rows")
        if pd.api.types.is_numeric_dtype(values):
            y = pd.to_numeric(values).to_numpy(np.float64)
            if not np.isfinite(y).all():  # refused as empty cells are: no metric means anything with them
                bad = sorted({str(v) for v in y[~np.isfinite(y)]})
                raise DataError(
                    manifest,
                    f"column {name!r} has non-finite values ({', '.join(bad)}) on CSV lines "
                    f"{_csv_lines(~np.isfinite(y))}; fix or drop those rows",
                )
            if len(np.unique(y)) < 2:
                raise DataError(
                    manifest,
                    f"column {name!r} has one value ({y[0]:g}): nothing to probe; leave it out of --covariates",
                )
            out[name] = y
            continue
        text = values.astype(str)
        classes = sorted(text.unique())
        if len(classes) < 2:
            raise DataError(
                manifest,
                f"column {name!r} has one value ({classes[0]}): nothing to probe; leave it out of --covariates",
            )
        # subjects, not sessions, as the folds stratify them: a subject counts under its first row's class
        subjects = text.groupby(df["subject_id"].astype(str), sort=False).first().value_counts()
        subjects = subjects.reindex(classes, fill_value=0)
        need = min_class_subjects(folds)
        small = subjects[subjects < need].sort_values()
        if len(small):
            counts = subjects.sort_values(kind="stable")
            shown = ", ".join(f"{c}: {k}" for c, k in counts.head(5).items()) + (", ..." if len(counts) > 5 else "")
            fixes = [f"leave {name!r} out of --covariates"]
            if small.min() >= min_class_subjects(3):  # a number of folds its smallest class fills
                fixes.append(f"use --folds {small.min()}")
            if len(classes) > 2:
                fixes.append("merge its small classes (a value per subject, such as an ID, cannot be probed)")
            raise DataError(
                manifest,
                f"column {name!r}: {len(small)} of its {len(classes)} classes {'has' if len(small) == 1 else 'have'} "
                f"fewer than {need} subjects (subjects per class: {shown}), too few for {folds} outer folds (each "
                f"class needs one subject per fold and 2 on every training side); {', or '.join(fixes)}",
            )
        out[name] = text.map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    return out


def subject_counts(y: np.ndarray, groups: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes,) subjects of each class among the rows, a subject counted under its first row's class."""
    return np.bincount(y[np.unique(groups, return_index=True)[1]], minlength=n_classes)


def stratified_group_folds(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list:
    """(train, test) row splits that keep a subject's rows together and stratify the subjects by class (a subject's
    first row's), shuffled by ``seed``: each class's subjects spread evenly over the folds whatever their sessions
    (scikit-learn's ``StratifiedGroupKFold`` balances rows, so one subject with many sessions can take a fold)."""
    subjects, first = np.unique(groups, return_index=True)
    splits = []
    for _, test in StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(subjects, y[first]):
        held = np.isin(groups, subjects[test])
        splits.append((np.flatnonzero(~held), np.flatnonzero(held)))
    return splits


def outer_folds(y: np.ndarray, groups: np.ndarray, continuous: bool, folds: int, seed: int) -> list:
    """The outer (train, test) row splits: by subject, shuffled by ``seed``, stratified by class when categorical."""
    if continuous:
        outer = GroupKFold(n_splits=min(folds, len(np.unique(groups))), shuffle=True, random_state=seed)
        return list(outer.split(np.zeros(len(y)), y, groups))
    return stratified_group_folds(y, groups, folds, seed)


def cross_validated(x: np.ndarray, y: np.ndarray, groups: np.ndarray, continuous: bool, folds: int, seed: int):
    """Out-of-fold predictions (n,) or probabilities (n, C): outer folds over subjects (``outer_folds``),
    regularisation by a 3-fold inner subject-level CV on each outer training set (stratified when categorical, with
    at most as many folds as its smallest class has subjects)."""
    n_classes = 0 if continuous else int(y.max()) + 1
    out = np.zeros(len(y)) if continuous else np.zeros((len(y), n_classes))
    for train, test in outer_folds(y, groups, continuous, folds, seed):
        if continuous:
            model, grid, scoring = Ridge(), {"alpha": ALPHAS}, "neg_mean_absolute_error"
            inner = GroupKFold(n_splits=min(3, len(np.unique(groups[train]))), shuffle=True, random_state=seed)
        else:
            model = LogisticRegression(class_weight="balanced", max_iter=3000)
            grid, scoring = {"C": CS}, "balanced_accuracy"
            # 2+ subjects of every class here (``min_class_subjects``), so each inner training set keeps every class
            n_inner = min(3, subject_counts(y[train], groups[train], n_classes).min())
            inner = stratified_group_folds(y[train], groups[train], n_inner, seed)
        # standardised on the outer training rows and fitted in their span (``finetune.linear``): thousands of
        # voxels become n columns, and every inner fit's rows lie in that span, so the fits are unchanged
        xs = standardised_row_space(x, train)
        search = GridSearchCV(model, grid, scoring=scoring, cv=inner)
        with threadpool_limits(limits=1, user_api="blas"):
            search.fit(xs[train], y[train], groups=groups[train])
            if continuous:
                out[test] = search.predict(xs[test])
            else:
                out[np.ix_(test, search.classes_)] = search.predict_proba(xs[test])
    return out


def score(y: np.ndarray, out: np.ndarray, continuous: bool) -> dict[str, float]:
    """The probe's metrics for one covariate: r and MAE, or balanced accuracy and ROC-AUC."""
    m = regression_metrics(y, out) if continuous else classification_metrics(y, out)
    return {k: m[k] for k in METRICS["continuous" if continuous else "categorical"]}


def features(cfg: RunConfig, init: str, volumes: torch.Tensor) -> np.ndarray:
    """(N, feature_dim) frozen pooled features of ``cfg.backbone`` loaded with ``init`` (``scratch``: random
    weights from ``cfg.seed``)."""
    seed_everything(cfg.seed)
    backbone = build_backbone(cfg)
    if init != "scratch":
        log.info("%s: %s", init, load_backbone(backbone, init, axis=cfg.init_axis).summary())
        check_parity(init, cfg.data)  # a warning per preprocessing mismatch with the export's pre-training
    device = resolve_device(cfg.train.device, key="train.device")
    precision = resolve_precision(cfg.train.precision, device, key="train.precision")
    return extract_features(backbone, volumes, cfg.train.batch_size, device, precision).numpy().astype(np.float64)


def run_probe(
    cfg: RunConfig, covariates: tuple[str, ...] | None = None, folds: int = 5, out: str | Path | None = None
) -> pd.DataFrame:
    """The probe table: one row per covariate × feature set (``init``, ``random``, ``classical``), written to
    ``out/probe.csv`` when ``out`` is given."""
    validate(cfg)
    if folds < 2:
        raise ConfigError(f"--folds {folds}: the probe needs at least 2 outer folds (default 5)")
    check_init_path(cfg.init)
    df = read_manifest(cfg.manifest, required=("path", "subject_id"), check_files=True)
    asked = covariates is not None
    names = tuple(covariates) if asked else tuple(c for c in COVARIATES if c in df.columns)
    if not names:
        raise DataError(cfg.manifest, f"none of the covariates {', '.join(COVARIATES)} is a column; nothing to probe")
    groups = df["subject_id"].astype(str).to_numpy()
    n_subjects = len(np.unique(groups))
    if n_subjects < 4:
        raise DataError(cfg.manifest, f"{n_subjects} subjects: the probe's folds need at least 4")
    if folds > n_subjects:
        raise ConfigError(f"--folds {folds}: more outer folds than the {n_subjects} subjects of {cfg.manifest}")
    targets = covariate_targets(df, names, cfg.manifest, folds)
    volumes = load_volumes(df, cfg.data)  # (N, 1, D, H, W), fine-tuning's preprocessing
    sets = {"init": features(cfg, cfg.init, volumes), "random": features(cfg, "scratch", volumes)}
    if cfg.classical_pool:
        sets["classical"] = classical.voxel_features(volumes, cfg.classical_pool)
    rows = []
    for name, y in targets.items():
        continuous = y.dtype == np.float64
        for label, x in sets.items():
            pred = cross_validated(x, y, groups, continuous, folds, cfg.seed)
            rows.append({"covariate": name, "features": label, "n": len(y), **score(y, pred, continuous)})
    table = pd.DataFrame(rows)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / "probe.csv", table.to_csv(index=False))
    return table


def format_table(table: pd.DataFrame, init: str) -> str:
    """The probe table as text: one line per covariate, the three feature sets side by side."""
    lines = [f"probe of {init} (features: init | random init, same architecture | classical voxels)"]
    for name, part in table.groupby("covariate", sort=False):
        metrics = [
            m for m in ("pearson_r", "mae", "balanced_accuracy", "roc_auc") if m in part and part[m].notna().any()
        ]
        cells = [
            f"{row.features} " + " ".join(f"{m}={getattr(row, m):.3f}" for m in metrics) for row in part.itertuples()
        ]
        lines.append(f"{name:>10}: " + " | ".join(cells))
    return "\n".join(lines)
