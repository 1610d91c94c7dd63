"""What a checkpoint's frozen features know: cross-validated linear fits of a manifest's covariates.

``python -m finetune probe --init SPEC --manifest M`` reads the manifest's images through fine-tuning's own
pipeline (``finetune.run.load_task_data``'s reader and preprocessing), extracts the frozen pooled features of the
init (``finetune.modes.linear_probe.extract_features``), of the same architecture from random weights, and the
classical baseline's pooled voxels (``finetune.classical.voxel_features``), and fits each covariate on each:
ridge for a numeric column (age), class-balanced logistic regression for a text one (sex, diagnosis, site).
Outer folds are subject-level and seeded (``GroupKFold`` with shuffling for a continuous covariate; for a
categorical one ``stratified_group_folds``, which stratifies the subjects by class, and each class needs
``min_class_subjects(folds)`` subjects, so that every outer and inner training set holds every class); the features
are standardised on the outer training rows and the L2 penalty is chosen by an inner subject-level CV on those rows
only, from the linear probe's ``train.probe_l2`` (for the classical voxels, the classical baseline's
``classical.L2``). Metrics are of the pooled out-of-fold predictions: Pearson r and MAE for continuous covariates,
balanced accuracy and ROC-AUC for categorical ones. A covariate's rows with an empty cell are left out of its fits and
counted in the log (``missing=drop``; ``missing=error`` refuses them). A covariate that cannot be fitted (one value,
or a class too small for the folds) is skipped with the reason — logged, and a row of the table — and the others are
probed; a covariate that is absent or has non-finite cells, ``--folds`` below 2 or above the subjects, and a
manifest whose every covariate is skipped are refused before any feature is extracted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
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
from finetune.linear import estimator, param_grid, standardised_row_space
from finetune.metrics import classification_metrics, regression_metrics
from finetune.modes.linear_probe import extract_features
from finetune.parity import check_parity
from finetune.run import build_backbone, check_init_path

log = logging.getLogger(__name__)
COVARIATES = ("age", "sex", "diagnosis", "site")  # probed by default, where the manifest has them
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
    df: pd.DataFrame, names: tuple[str, ...], manifest: str | Path, folds: int = 5, missing: str = "drop"
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """``(targets, skipped)``. ``targets``, each covariate of ``names`` that can be fitted: the rows it is fitted on
    and its values there, a numeric column (continuous) as float, a text one (categorical) as class indices.
    ``skipped``, each that cannot, with the reason: one value, or (text) a class of fewer than
    ``min_class_subjects(folds)`` subjects. Rows with an empty cell are left out of that covariate and logged
    (``missing="drop"``) or refused (``"error"``). A column that is absent or has non-finite cells is a
    ``DataError`` naming it."""
    out, skipped = {}, {}
    for name in names:
        if name not in df.columns:
            raise DataError(manifest, f"no column {name!r} to probe; the columns are {', '.join(df.columns)}")
        empty = df[name].isna().to_numpy()
        if empty.any() and missing == "error":
            rows = _csv_lines(empty)
            raise DataError(
                manifest,
                f"column {name!r} has empty cells (CSV lines {rows}); fill them, or drop them with missing=drop",
            )
        if empty.any():
            log.info("%s: left out %d rows with an empty %r from its probe (missing=drop)", manifest, empty.sum(), name)
        kept = np.flatnonzero(~empty)
        values = df[name][~empty]
        if pd.api.types.is_numeric_dtype(values):
            every = pd.to_numeric(df[name]).to_numpy(np.float64)
            if np.isinf(every).any():  # refused, not dropped: an infinite age is a broken value, not a missing one
                bad = sorted({str(v) for v in every[np.isinf(every)]})
                raise DataError(
                    manifest,
                    f"column {name!r} has non-finite values ({', '.join(bad)}) on CSV lines "
                    f"{_csv_lines(np.isinf(every))}; fix or drop those rows",
                )
            y = every[kept]
            if len(np.unique(y)) < 2:
                skipped[name] = f"column {name!r} has one value ({y[0]:g}): nothing to probe"
            else:
                out[name] = (kept, y)
            continue
        text = values.astype(str)
        classes = sorted(text.unique())
        if len(classes) < 2:
            skipped[name] = f"column {name!r} has one value ({classes[0]}): nothing to probe"
            continue
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
            skipped[name] = (
                f"column {name!r}: {len(small)} of its {len(classes)} classes {'has' if len(small) == 1 else 'have'} "
                f"fewer than {need} subjects (subjects per class: {shown}), too few for {folds} outer folds (each "
                f"class needs one subject per fold and 2 on every training side); {', or '.join(fixes)}"
            )
            continue
        out[name] = (kept, text.map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64))
    return out, skipped


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


def cross_validated(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, continuous: bool, folds: int, seed: int, l2: Sequence[float]
):
    """Out-of-fold predictions (n,) or probabilities (n, C): outer folds over subjects (``outer_folds``), the L2
    penalty chosen from ``l2`` by a 3-fold inner subject-level CV on each outer training set (stratified when
    categorical, with at most as many folds as its smallest class has subjects)."""
    kind = "regression" if continuous else "classification"
    n_classes = 0 if continuous else int(y.max()) + 1
    out = np.zeros(len(y)) if continuous else np.zeros((len(y), n_classes))
    for train, test in outer_folds(y, groups, continuous, folds, seed):
        if continuous:
            scoring = "neg_mean_absolute_error"
            inner = GroupKFold(n_splits=min(3, len(np.unique(groups[train]))), shuffle=True, random_state=seed)
        else:
            scoring = "balanced_accuracy"
            # 2+ subjects of every class here (``min_class_subjects``), so each inner training set keeps every class
            n_inner = min(3, subject_counts(y[train], groups[train], n_classes).min())
            inner = stratified_group_folds(y[train], groups[train], n_inner, seed)
        # standardised on the outer training rows and fitted in their span (``finetune.linear``): thousands of
        # voxels become n columns, and every inner fit's rows lie in that span, so the fits are unchanged
        xs = standardised_row_space(x, train)
        search = GridSearchCV(estimator(kind, 1.0), param_grid(kind, l2), scoring=scoring, cv=inner)
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
    weights from ``cfg.train.seed``)."""
    seed_everything(cfg.train.seed)
    backbone = build_backbone(cfg)
    if init != "scratch":
        log.info(
            "%s: %s",
            init,
            load_backbone(backbone, init, axis=cfg.init_axis, allow_partial=cfg.allow_partial_init).summary(),
        )
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
    targets, skipped = covariate_targets(df, names, cfg.manifest, folds, cfg.missing)
    if not targets:
        raise DataError(cfg.manifest, "nothing to probe: " + "; ".join(skipped.values()))
    for reason in skipped.values():
        log.warning("%s: probe skips %s", cfg.manifest, reason)
    volumes = load_volumes(df, cfg.data)  # (N, 1, D, H, W), fine-tuning's preprocessing
    sets = {"init": features(cfg, cfg.init, volumes), "random": features(cfg, "scratch", volumes)}
    if cfg.classical_pool:
        sets["classical"] = classical.voxel_features(volumes, cfg.classical_pool)
    rows = []
    for name, (kept, y) in targets.items():
        continuous = y.dtype == np.float64
        kind = "regression" if continuous else "classification"
        for label, x in sets.items():
            l2 = classical.L2[kind] if label == "classical" else cfg.train.probe_l2  # the grids a cell fits them with
            pred = cross_validated(x[kept], y, groups[kept], continuous, folds, cfg.train.seed, l2)
            rows.append({"covariate": name, "features": label, "n": len(y), **score(y, pred, continuous)})
    rows += [{"covariate": name, "skipped": reason} for name, reason in skipped.items()]
    table = pd.DataFrame(rows)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / "probe.csv", table.to_csv(index=False))
    return table


def format_table(table: pd.DataFrame, init: str) -> str:
    """The probe table as text: one line per covariate, the three feature sets side by side (or why it was
    skipped)."""
    lines = [f"probe of {init} (features: init | random init, same architecture | classical voxels)"]
    for name, part in table.groupby("covariate", sort=False):
        if "skipped" in part and part["skipped"].notna().any():
            lines.append(f"{name:>10}: skipped — {part['skipped'].dropna().iloc[0]}")
            continue
        metrics = [
            m for m in ("pearson_r", "mae", "balanced_accuracy", "roc_auc") if m in part and part[m].notna().any()
        ]
        cells = [
            f"{row.features} " + " ".join(f"{m}={getattr(row, m):.3f}" for m in metrics) for row in part.itertuples()
        ]
        lines.append(f"{name:>10}: " + " | ".join(cells))
    return "\n".join(lines)
