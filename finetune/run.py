"""One cell of the benchmark: a task, a backbone with an init, one training fraction, one seed, all folds.

``prepare`` does every check that can fail on bad input (manifest, labels, init, images, splits, leakage)
before ``run_cell`` trains anything. A run directory holds ``config.yaml``, ``weights_report.json``,
``splits.csv`` (subject_id, fold, split), ``predictions.csv``, ``classical_predictions.csv`` (the classical
baseline's, same folds), ``per_site.csv``, ``metrics.json`` (written last: its presence marks the cell finished)
and ``tb/``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from common.config import save_config
from common.data import read_manifest
from common.distributed import seed_everything
from common.errors import CheckpointError, ConfigError
from common.io import atomic_write
from common.models import create_backbone
from common.tb import RankZeroWriter
from common.weights import LoadReport, load_backbone, parse_init
from finetune import classical
from finetune.config import RunConfig, validate
from finetune.data import load_volumes, preprocess_config
from finetune.metrics import PRIMARY, BiasCorrection, per_site, score_predictions, youden_threshold
from finetune.modes import MODES, FoldInputs
from finetune.parity import check_parity
from finetune.protocol import (
    Fold,
    check_pretrain_overlap,
    check_splits,
    make_folds,
    nested_subset,
    read_splits,
    splits_frame,
    subject_table,
)
from finetune.tasks import Task, get_task, label_rows

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"
CLASSICAL_FILE = "classical_predictions.csv"  # the classical baseline's val/test predictions, same folds
MIN_BIAS_SLOPE = 0.25  # below this (pred - b) / a multiplies a weak model's noise by > 4: not reported


@dataclass
class Prepared:
    """Everything a cell needs, checked: labelled rows, volumes, folds, the initialised backbone."""

    task: Task
    df: pd.DataFrame  # the task's rows
    y: np.ndarray
    classes: tuple[str, ...] | None
    volumes: torch.Tensor  # (N, 1, D, H, W)
    folds: list[Fold]
    train_subsets: dict[int, np.ndarray]
    splits: pd.DataFrame
    backbone: nn.Module  # built and initialised once; folds train deep copies
    report: LoadReport
    dropped: dict[str, int] = field(default_factory=dict)  # rows left out by label (drop_labels)


def build_backbone(cfg: RunConfig) -> nn.Module:
    kwargs = dict(cfg.backbone.kwargs)
    return create_backbone(cfg.backbone.name, img_size=tuple(cfg.data.shape), in_chans=1, **kwargs)


def check_init_path(init: str) -> None:
    """Fail early on an init whose file or folder does not exist (a typo should not wait for volumes)."""
    kind, path = parse_init(init)
    if path is not None and not path.exists():
        article = "an" if kind[0] in "aeiou" else "a"
        raise CheckpointError(f"{path}: init {init!r} names {article} {kind} source that does not exist")


@dataclass
class TaskData:
    """One task's checked rows, labels, volumes and subjects: what every cell on that task shares."""

    task: Task
    df: pd.DataFrame  # the task's rows
    y: np.ndarray
    classes: tuple[str, ...] | None
    volumes: torch.Tensor  # (N, 1, D, H, W)
    subjects: pd.DataFrame  # finetune.protocol.subject_table
    dropped: dict[str, int] = field(default_factory=dict)  # rows left out by label (drop_labels)


def task_data_key(cfg: RunConfig) -> str:
    """Cells with equal keys share their ``TaskData`` (same task, manifest, preprocessing, duplicate check)."""
    pre = preprocess_config(cfg.data).describe()
    return json.dumps([cfg.task, cfg.manifest, cfg.drop_labels, pre, cfg.protocol.check_duplicates], default=str)


def load_task_data(cfg: RunConfig) -> TaskData:
    """Read and check the manifest, labels and every image (a corrupt file fails here, before any training)."""
    validate(cfg)
    task = get_task(cfg.task)
    df = read_manifest(cfg.manifest, required=("path", "subject_id"), check_files=True)
    labelled = label_rows(task, df, cfg.manifest, cfg.drop_labels)
    if labelled.dropped:
        log.info(
            "%s: left out %s rows by drop_labels (%s)",
            cfg.manifest,
            sum(labelled.dropped.values()),
            ", ".join(f"{k}: {n}" for k, n in labelled.dropped.items()),
        )
    volumes = load_volumes(labelled.df, cfg.data)
    subjects = subject_table(labelled.df, labelled.y, task.is_classification, cfg.protocol.check_duplicates)
    return TaskData(task, labelled.df, labelled.y, labelled.classes, volumes, subjects, labelled.dropped)


def prepare(cfg: RunConfig, data: TaskData | None = None) -> Prepared:
    """Check all inputs of one cell; a ``NeurotransferError`` names the file/column before any training.

    ``data`` is the cell's ``TaskData`` when the caller (the grid) has read it already, else it is read here.
    """
    validate(cfg)
    get_task(cfg.task)
    check_init_path(cfg.init)
    seed_everything(cfg.seed)  # a scratch backbone's random weights follow the seed
    backbone = build_backbone(cfg)
    report = load_backbone(backbone, cfg.init, axis=cfg.init_axis)
    report.notes += check_parity(cfg.init, cfg.data)  # logged, and kept in weights_report.json and metrics.json
    data = data or load_task_data(cfg)
    subjects = data.subjects
    if cfg.protocol.splits_file:
        folds = read_splits(cfg.protocol.splits_file, subjects["subject_id"])
    else:
        folds = make_folds(subjects, cfg.protocol, cfg.seed)
    # the subset seed ignores the fraction, so smaller training sets are nested inside larger ones
    subsets = {f.fold: nested_subset(subjects, f.train, cfg.fraction, cfg.seed * 1000 + f.fold) for f in folds}
    splits = splits_frame(folds, subsets)
    source = cfg.protocol.splits_file or cfg.manifest
    check_splits(splits, data.df, source, cfg.protocol.check_duplicates)
    tests = data.df["path"][data.df["subject_id"].astype(str).isin(splits.loc[splits.split == "test", "subject_id"])]
    check_pretrain_overlap(tests, cfg.protocol.pretrain_manifests)
    return Prepared(
        data.task, data.df, data.y, data.classes, data.volumes, folds, subsets, splits, backbone, report, data.dropped
    )


def _features_key(cfg: RunConfig, prep: Prepared) -> str:
    """What the frozen features depend on: the initialised weights (hashed), preprocessing and the images."""
    digest = hashlib.sha1()
    for name, tensor in prep.backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return json.dumps(
        [prep.backbone.arch, digest.hexdigest(), preprocess_config(cfg.data).describe(), list(prep.df["path"])],
        default=str,
    )


def check_run_folder(out: Path, cfg: RunConfig, overwrite: bool) -> None:
    """Refuse, before any work, an ``out`` that is a file, holds a finished run, or holds another run
    (``overwrite``: it will be replaced whole)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out is a file, not a run folder; choose a folder path")
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    hint = "pass --overwrite to replace it whole, or choose another --out"
    if (out / METRICS_FILE).is_file():
        raise ConfigError(f"{out}: holds a finished run ({METRICS_FILE}); {hint}")
    if not (out / "config.yaml").is_file():
        raise ConfigError(f"{out}: is not empty and holds no fine-tuning run; {hint}")
    old = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))
    new = OmegaConf.to_container(OmegaConf.structured(cfg))
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differ:
        raise ConfigError(f"{out}: holds an unfinished run with other settings ({', '.join(differ)}); {hint}")


def run_cell(
    cfg: RunConfig | DictConfig, out_dir: str | Path, prepared: Prepared | None = None, overwrite: bool = False
) -> dict:
    """Run every fold of one cell and write the run directory; returns the content of ``metrics.json``.

    The folder is written beside ``out_dir`` (``.NAME.partial``) and moved into place only when the run has
    finished: a run that fails leaves no folder, and an existing one is never half rewritten.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
    final = Path(out_dir)
    check_run_folder(final, cfg, overwrite)
    prep = prepared or prepare(cfg)
    out = final.with_name(f".{final.name}.partial")
    shutil.rmtree(out, ignore_errors=True)  # left by a killed run
    out.mkdir(parents=True)
    try:
        result = _write_cell(cfg, prep, out, cfg.cache_dir or str(out / "cache"))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(out, final)
    return result


def _write_cell(cfg: RunConfig, prep: Prepared, out: Path, cache_dir: str) -> dict:
    save_config(OmegaConf.structured(cfg), out / "config.yaml")
    prep.report.save(out / "weights_report.json")
    prep.splits.to_csv(out / "splits.csv", index=False)

    task, df, y = prep.task, prep.df, prep.y
    kind = task.kind
    n_classes = len(prep.classes) if prep.classes else 0
    subject = df["subject_id"].astype(str).to_numpy()
    rows_of = lambda ids: np.flatnonzero(np.isin(subject, np.asarray(ids, dtype=str)))
    features_key = _features_key(cfg, prep)
    tb = RankZeroWriter(out / "tb")
    mode = MODES[cfg.train.mode]
    tables, baselines, classical_tables, fold_info = [], [], [], []
    voxels = classical.voxel_features(prep.volumes, cfg.classical_pool) if cfg.classical_pool else None
    for fold in prep.folds:
        tr, va, te = rows_of(prep.train_subsets[fold.fold]), rows_of(fold.val), rows_of(fold.test)
        inputs = FoldInputs(
            volumes=prep.volumes,
            make_backbone=lambda: copy.deepcopy(prep.backbone),
            train_idx=tr,
            val_idx=va,
            test_idx=te,
            y=y,
            kind=kind,
            n_classes=n_classes,
            seed=cfg.seed * 1000 + fold.fold,
            features_key=features_key,
            cache_dir=cache_dir,
            tb=tb,
            tb_prefix=f"fold{fold.fold}/",
            augment=cfg.data.augment,
            fold=fold.fold,
            out_dir=str(out),
        )
        val_out, test_out, info = mode(inputs, cfg.train)
        fold_info.append(
            {
                "fold": fold.fold,
                "name": fold.name,
                "n_train": len(tr),
                "n_val": len(va),
                "n_test": len(te),
                **info,
            }
        )
        log.info("fold %s: %s", fold.fold, fold_info[-1])
        for split, idx, output in (("val", va, val_out), ("test", te, test_out)):
            tables.append(_prediction_table(df, y, idx, output, kind, fold.fold, split))
        baselines.append(_baseline_table(df, y, tr, te, kind, n_classes, fold.fold))
        if voxels is not None:  # the classical baseline on the same fold (``finetune.classical``)
            val_c, test_c, fold_info[-1]["classical"] = classical.fit_predict(voxels, y, kind, tr, va, te)
            classical_tables += [
                _prediction_table(df, y, va, val_c, kind, fold.fold, "val"),
                _prediction_table(df, y, te, test_c, kind, fold.fold, "test"),
            ]
        for pair in (tables[-2:], classical_tables[-2:]) if voxels is not None else (tables[-2:],):
            if kind == "regression":
                _correct_bias(*pair)
            elif n_classes == 2:
                _decision_threshold(*pair, cfg.threshold)
    predictions = pd.concat(tables, ignore_index=True)
    predictions.to_csv(out / "predictions.csv", index=False)
    classical_scores = {}
    if classical_tables:
        reference = pd.concat(classical_tables, ignore_index=True)
        reference.to_csv(out / CLASSICAL_FILE, index=False)
        classical_scores = score_predictions(
            reference[reference["split"] == "test"], kind, n_boot=cfg.bootstrap, seed=cfg.seed
        )

    test = predictions[predictions["split"] == "test"]
    metrics = score_predictions(test, kind, n_boot=cfg.bootstrap, seed=cfg.seed)
    baseline = score_predictions(pd.concat(baselines, ignore_index=True), kind, n_boot=cfg.bootstrap, seed=cfg.seed)
    sites = per_site(test, kind) if "site" in test else pd.DataFrame()
    sites.to_csv(out / "per_site.csv", index=False)
    primary, higher = PRIMARY[kind]
    for name, value in metrics.items():
        if np.isfinite(value) and not name.endswith(("_lo", "_hi")):
            tb.add_scalar(f"test/{name}", value, 0)
    tb.close()
    result = {
        "task": task.name,
        "kind": kind,
        "primary": primary,
        "higher_is_better": higher,
        "backbone": cfg.backbone.name,
        "init": cfg.init,
        "mode": cfg.train.mode,
        "fraction": cfg.fraction,
        "seed": cfg.seed,
        "classes": list(prep.classes) if prep.classes else None,
        "n_subjects": int(df["subject_id"].nunique()),
        "dropped_labels": prep.dropped,  # rows of the manifest left out by drop_labels, by label
        "n_test_images": len(test),
        "metrics": _clean(metrics),
        "baseline": _clean(baseline),
        "classical": _clean(classical_scores),
        "folds": fold_info,
        "per_site": sites.to_dict(orient="records"),
        "weights": prep.report.summary(),
    }
    with atomic_write(out / METRICS_FILE) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=_json_default))
    return result


def _prediction_table(df, y, idx, output, kind, fold, split) -> pd.DataFrame:
    keep = [c for c in ("subject_id", "session_id", "path", "site", "dataset") if c in df.columns]
    table = df.iloc[idx][keep].reset_index(drop=True).assign(fold=fold, split=split, y_true=y[idx])
    if kind == "classification":
        for c in range(output.shape[1]):
            table[f"prob_{c}"] = output[:, c]
    else:
        table["y_pred"] = output
    return table


def _baseline_table(df, y, tr, te, kind, n_classes, fold) -> pd.DataFrame:
    """The trivial predictor on the fold's test rows: training class priors, or the training mean."""
    table = df.iloc[te][["subject_id"] + (["site"] if "site" in df else [])].reset_index(drop=True)
    table = table.assign(fold=fold, split="test", y_true=y[te])
    if kind == "classification":
        prior = np.bincount(y[tr], minlength=n_classes) / len(tr)
        for c in range(n_classes):
            table[f"prob_{c}"] = prior[c]
    else:
        table["y_pred"] = float(np.mean(y[tr]))
    return table


def _correct_bias(val: pd.DataFrame, test: pd.DataFrame) -> None:
    """Brain-age bias correction fitted on this fold's validation predictions only, applied to both; left
    empty (NaN) when the validation set is too small (< 5) or its predictions carry no age trend to invert."""
    corr = BiasCorrection().fit(val["y_true"], val["y_pred"]) if len(val) >= 5 else None
    if corr is None or corr.slope < MIN_BIAS_SLOPE:
        val["y_pred_corrected"] = test["y_pred_corrected"] = np.nan
        return
    val["y_pred_corrected"] = corr.apply(val["y_pred"])
    test["y_pred_corrected"] = corr.apply(test["y_pred"])


def _decision_threshold(val: pd.DataFrame, test: pd.DataFrame, rule: str) -> None:
    """The fold's cut on ``prob_1`` for the threshold metrics (accuracy, sensitivity ...): ``youden`` fitted on
    its validation predictions (0.5 with fewer than 5 of them), or ``argmax`` (0.5); ROC-AUC ignores it."""
    cut = youden_threshold(val["y_true"], val["prob_1"]) if rule == "youden" and len(val) >= 5 else 0.5
    val["threshold"] = test["threshold"] = cut


def _clean(metrics: dict) -> dict:
    return {k: (None if not np.isfinite(v) else float(v)) for k, v in metrics.items()}


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
