"""One cell of the benchmark: a task, a backbone with an init, one training fraction, one seed, all folds.

``prepare`` does every check that can fail on bad input (manifest, labels, init, images, splits, leakage)
before ``run_cell`` trains anything. A run directory holds ``config.yaml``, ``weights_report.json``,
``splits.csv`` (subject_id, fold, split), ``predictions.csv``, ``classical_predictions.csv`` (the classical
baseline's, same folds), ``per_site.csv``, each fold's fine-tuned model (``model/`` for a single fold,
``fold{k}/model/`` for several: ``finetune.model_folder``, applied by ``finetune predict``), ``metrics.json``
(written last: its presence marks the cell finished) and ``tb/``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from common.config import config_values, load_config, save_config
from common.data import read_manifest
from common.distributed import seed_everything
from common.errors import CheckpointError, ConfigError
from common.io import atomic_write
from common.models import create_backbone
from common.tb import RankZeroWriter
from common.weights import LoadReport, load_backbone, parse_init
from finetune import classical
from finetune.arch import resolve_arch
from finetune.config import RunConfig, validate
from finetune.data import load_volumes, preprocess_config
from finetune.heads import FineTuneModel
from finetune.metrics import PRIMARY, BiasCorrection, per_site, score_predictions, youden_threshold
from finetune.model_folder import model_dir, write_model_folder
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
ID_COLUMNS = ("subject_id", "session_id", "path", "site", "dataset")  # a predictions.csv row's scan, as manifested
MIN_BIAS_SLOPE = 0.25  # below this (pred - b) / a multiplies a weak model's noise by > 4: not reported


def build_backbone(cfg: RunConfig) -> nn.Module:
    """The cell's backbone for ``data.shape`` volumes, in the architecture ``finetune.arch.resolve_arch`` gives."""
    name, kwargs = resolve_arch(cfg)
    return create_backbone(name, img_size=tuple(cfg.data.shape), in_chans=1, **kwargs)


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
    missing: int = 0  # rows left out for an empty label cell (missing=drop)


@dataclass
class Prepared:
    """Everything a cell needs, checked: its task's data, the folds, the initialised backbone."""

    data: TaskData
    folds: list[Fold]
    train_subsets: dict[int, np.ndarray]
    splits: pd.DataFrame
    backbone: nn.Module  # built and initialised once; folds train deep copies
    report: LoadReport


def task_data_key(cfg: RunConfig) -> str:
    """Cells with equal keys share their ``TaskData`` (same task, manifest, preprocessing, duplicate check)."""
    pre = preprocess_config(cfg.data).describe()
    key = [cfg.task, cfg.manifest, cfg.drop_labels, cfg.missing, pre, cfg.protocol.check_duplicates]
    return json.dumps(key, default=str)


def load_task_data(cfg: RunConfig) -> TaskData:
    """Read and check the manifest, labels and every image (a corrupt file fails here, before any training)."""
    validate(cfg)
    task = get_task(cfg.task)
    df = read_manifest(cfg.manifest, required=("path", "subject_id"), check_files=True)
    labelled = label_rows(task, df, cfg.manifest, cfg.drop_labels, cfg.missing)
    if labelled.missing:
        log.info("%s: left out %s rows with an empty %r (missing=drop)", cfg.manifest, labelled.missing, task.column)
    if labelled.dropped:
        log.info(
            "%s: left out %s rows by drop_labels (%s)",
            cfg.manifest,
            sum(labelled.dropped.values()),
            ", ".join(f"{k}: {n}" for k, n in labelled.dropped.items()),
        )
    volumes = load_volumes(labelled.df, cfg.data)
    subjects = subject_table(labelled.df, labelled.y, task.is_classification, cfg.protocol.check_duplicates)
    return TaskData(
        task, labelled.df, labelled.y, labelled.classes, volumes, subjects, labelled.dropped, labelled.missing
    )


def prepare(cfg: RunConfig, data: TaskData | None = None) -> Prepared:
    """Check all inputs of one cell; a ``NeurotransferError`` names the file/column before any training.

    ``data`` is the cell's ``TaskData`` when the caller (the grid) has read it already, else it is read here.
    """
    validate(cfg)
    get_task(cfg.task)
    check_init_path(cfg.init)
    seed_everything(cfg.train.seed)  # a scratch backbone's random weights follow the seed
    backbone = build_backbone(cfg)
    report = load_backbone(backbone, cfg.init, axis=cfg.init_axis, allow_partial=cfg.allow_partial_init)
    report.notes += check_parity(cfg.init, cfg.data)  # logged, and kept in weights_report.json and metrics.json
    data = data or load_task_data(cfg)
    subjects = data.subjects
    if cfg.protocol.splits_file:
        folds = read_splits(cfg.protocol.splits_file, subjects["subject_id"])
    else:
        folds = make_folds(subjects, cfg.protocol, cfg.train.seed)
    # the subset seed ignores the fraction, so smaller training sets are nested inside larger ones
    subsets = {f.fold: nested_subset(subjects, f.train, cfg.fraction, cfg.train.seed * 1000 + f.fold) for f in folds}
    splits = splits_frame(folds, subsets)
    source = cfg.protocol.splits_file or cfg.manifest
    check_splits(splits, data.df, source, cfg.protocol.check_duplicates)
    tests = data.df["path"][data.df["subject_id"].astype(str).isin(splits.loc[splits.split == "test", "subject_id"])]
    check_pretrain_overlap(tests, cfg.protocol, cfg.init)
    return Prepared(data, folds, subsets, splits, backbone, report)


def _features_key(cfg: RunConfig, prep: Prepared) -> str:
    """What the frozen features depend on: the initialised weights (hashed), preprocessing and the images."""
    digest = hashlib.sha1()
    for name, tensor in prep.backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return json.dumps(
        [prep.backbone.arch, digest.hexdigest(), preprocess_config(cfg.data).describe(), list(prep.data.df["path"])],
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
    try:  # through the schema: a key renamed since the run was saved reads as the new key
        old = config_values(load_config(RunConfig, out / "config.yaml"))
    except ConfigError as e:
        raise ConfigError(f"{out}: cannot read the unfinished run's config.yaml ({e}); {hint}") from None
    new = config_values(cfg)
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


@dataclass
class FoldOutputs:
    """What a cell's folds predicted, as ``_prediction_table`` frames in fold order."""

    model: list[pd.DataFrame] = field(default_factory=list)  # the trained model's validation and test rows
    classical: list[pd.DataFrame] = field(default_factory=list)  # the classical baseline's, same rows (off: none)
    trivial: list[pd.DataFrame] = field(default_factory=list)  # the trivial predictor's test rows
    info: list[dict] = field(default_factory=list)  # each fold's sizes and what its mode reports (metrics.json)


@dataclass
class CellScores:
    """A cell's test metrics, each with its bootstrap CI bounds."""

    metrics: dict[str, float]  # the trained model's
    baseline: dict[str, float]  # the trivial predictor's
    classical: dict[str, float]  # the classical baseline's ({} when it is off)
    per_site: pd.DataFrame  # the model's point metrics per site (empty without a site column)
    n_test_images: int


def _write_cell(cfg: RunConfig, prep: Prepared, out: Path, cache_dir: str) -> dict:
    """Write the run folder: what the cell ran on, every fold's predictions, their scores (``metrics.json`` last)."""
    save_config(OmegaConf.structured(cfg), out / "config.yaml")
    prep.report.save(out / "weights_report.json")
    prep.splits.to_csv(out / "splits.csv", index=False)
    tb = RankZeroWriter(out / "tb")
    outputs = _predict_folds(cfg, prep, out, cache_dir, tb)
    predictions = pd.concat(outputs.model, ignore_index=True)
    predictions.to_csv(out / "predictions.csv", index=False)
    reference = pd.concat(outputs.classical, ignore_index=True) if outputs.classical else None
    if reference is not None:
        reference.to_csv(out / CLASSICAL_FILE, index=False)
    scores = _score_cell(cfg, prep.data.task.kind, predictions, reference, outputs.trivial)
    scores.per_site.to_csv(out / "per_site.csv", index=False)
    for name, value in scores.metrics.items():
        if np.isfinite(value) and not name.endswith(("_lo", "_hi")):
            tb.add_scalar(f"test/{name}", value, 0)
    tb.close()
    result = _metrics_record(cfg, prep, scores, outputs.info)
    with atomic_write(out / METRICS_FILE) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=_json_default))
    return result


def _predict_folds(cfg: RunConfig, prep: Prepared, out: Path, cache_dir: str, tb: RankZeroWriter) -> FoldOutputs:
    """Every fold's validation and test predictions: the mode's model, the trivial predictor and the classical
    baseline on the same rows, each table post-processed by what its fold's validation rows fit (``_calibrate``)."""
    data = prep.data
    kind, df, y = data.task.kind, data.df, data.y
    n_classes = len(data.classes) if data.classes else 0
    subject = df["subject_id"].astype(str).to_numpy()
    rows_of = lambda ids: np.flatnonzero(np.isin(subject, np.asarray(ids, dtype=str)))
    features_key = _features_key(cfg, prep)
    voxels = classical.voxel_features(data.volumes, cfg.classical_pool) if cfg.classical_pool else None
    outputs = FoldOutputs()
    for fold in prep.folds:
        tr, va, te = rows_of(prep.train_subsets[fold.fold]), rows_of(fold.val), rows_of(fold.test)
        fitted: list[FineTuneModel] = []  # the mode hands its trained model over (FoldInputs.on_fitted)
        val_out, test_out, info = _train_fold(
            cfg, prep, fold, (tr, va, te), features_key, cache_dir, tb, out, fitted.append
        )
        sizes = {"n_train": len(tr), "n_val": len(va), "n_test": len(te)}
        outputs.info.append({"fold": fold.fold, "name": fold.name, **sizes, **info})
        log.info("fold %s: %s", fold.fold, outputs.info[-1])
        tables = [
            _prediction_table(df, y, va, val_out, kind, fold.fold, "val"),
            _prediction_table(df, y, te, test_out, kind, fold.fold, "test"),
        ]
        outputs.trivial.append(_baseline_table(df, y, tr, te, kind, n_classes, fold.fold))
        calibration = _calibrate(*tables, kind, n_classes, cfg.threshold)
        outputs.model += tables
        for model in fitted:
            folder = model_dir(out, fold.fold, len(prep.folds))
            _save_model(cfg, prep, model, folder, calibration, outputs.info[-1], df.iloc[tr])
        if voxels is not None:  # the classical baseline on the same fold (``finetune.classical``)
            val_c, test_c, outputs.info[-1]["classical"] = classical.fit_predict(voxels, y, kind, tr, va, te)
            tables = [
                _prediction_table(df, y, va, val_c, kind, fold.fold, "val"),
                _prediction_table(df, y, te, test_c, kind, fold.fold, "test"),
            ]
            _calibrate(*tables, kind, n_classes, cfg.threshold)
            outputs.classical += tables
    return outputs


def _train_fold(
    cfg: RunConfig,
    prep: Prepared,
    fold: Fold,
    rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    features_key: str,
    cache_dir: str,
    tb: RankZeroWriter,
    out: Path,
    on_fitted: Callable[[nn.Module], None],
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train the cell's mode on one fold's (train, val, test) rows: its validation and test outputs and report;
    ``on_fitted`` gets the trained model."""
    tr, va, te = rows
    data = prep.data
    inputs = FoldInputs(
        volumes=data.volumes,
        make_backbone=lambda: copy.deepcopy(prep.backbone),
        train_idx=tr,
        val_idx=va,
        test_idx=te,
        y=data.y,
        kind=data.task.kind,
        n_classes=len(data.classes) if data.classes else 0,
        seed=cfg.train.seed * 1000 + fold.fold,
        features_key=features_key,
        cache_dir=cache_dir,
        tb=tb,
        tb_prefix=f"fold{fold.fold}/",
        augment=cfg.data.augment,
        fold=fold.fold,
        out_dir=str(out),
        on_fitted=on_fitted,
    )
    return MODES[cfg.train.mode](inputs, cfg.train, cfg.optim)


def _calibrate(val: pd.DataFrame, test: pd.DataFrame, kind: str, n_classes: int, threshold: str) -> dict:
    """A fold's post-processing, fitted on its validation table and applied to both: brain-age bias correction
    (regression) or the decision cut (binary classification); returns it as the fold's model folder records it
    (``bias_correction``: slope and intercept, or None; ``threshold``)."""
    if kind == "regression":
        corr = _correct_bias(val, test)
        return {"bias_correction": None if corr is None else {"slope": corr.slope, "intercept": corr.intercept}}
    if n_classes == 2:
        return {"threshold": _decision_threshold(val, test, threshold)}
    return {}


def _save_model(
    cfg: RunConfig,
    prep: Prepared,
    model: FineTuneModel,
    folder: Path,
    calibration: dict,
    info: dict,
    train: pd.DataFrame,
) -> Path:
    """A fold's fine-tuned model as a model folder (``finetune.model_folder``): with what decodes its outputs
    (classes, the head's target scaling, the calibration) and the precision its predictions were computed in."""
    data = prep.data
    task = {
        "name": data.task.name,
        "kind": data.task.kind,
        "column": data.task.column,
        "classes": list(data.classes) if data.classes else None,
        "target_mean": info.get("target_mean", 0.0),  # a head trained on z-scores: prediction = out * std + mean
        "target_std": info.get("target_std", 1.0),
        **calibration,
        "precision": info["precision"],  # what every mode reports: its outputs were computed in it
    }
    kind, path = parse_init(cfg.init)
    tuning = {
        "mode": cfg.train.mode,
        "init": kind if path is None else f"{kind}:{path.name}",  # no absolute path leaves the machine
        "fold": info["fold"],
        "fold_name": info["name"],
        "seed": cfg.train.seed,
        "fraction": cfg.fraction,
        **{k: info[k] for k in ("n_train", "n_val", "n_test", "val_score", "best_epoch", "head_init") if k in info},
    }
    return write_model_folder(folder, model, preprocess_config(cfg.data), task, {"fine_tuning": tuning}, train)


def _score_cell(
    cfg: RunConfig, kind: str, predictions: pd.DataFrame, reference: pd.DataFrame | None, trivial: list[pd.DataFrame]
) -> CellScores:
    """The test rows of the model, the classical baseline (``reference``; None when off) and the trivial predictor,
    scored with bootstrap CIs seeded by the cell's seed."""
    score = lambda table: score_predictions(table, kind, n_boot=cfg.bootstrap, seed=cfg.train.seed)
    classical_scores = score(reference[reference["split"] == "test"]) if reference is not None else {}
    test = predictions[predictions["split"] == "test"]
    return CellScores(
        metrics=score(test),
        baseline=score(pd.concat(trivial, ignore_index=True)),
        classical=classical_scores,
        per_site=per_site(test, kind) if "site" in test else pd.DataFrame(),
        n_test_images=len(test),
    )


def _metrics_record(cfg: RunConfig, prep: Prepared, scores: CellScores, folds: list[dict]) -> dict:
    """The content of ``metrics.json``: what the cell ran, on which rows, and its scores."""
    data = prep.data
    primary, higher = PRIMARY[data.task.kind]
    return {
        "task": data.task.name,
        "kind": data.task.kind,
        "primary": primary,
        "higher_is_better": higher,
        "backbone": prep.backbone.arch["name"],
        "init": cfg.init,
        "mode": cfg.train.mode,
        "fraction": cfg.fraction,
        "seed": cfg.train.seed,
        "classes": list(data.classes) if data.classes else None,
        "n_subjects": int(data.df["subject_id"].nunique()),
        "dropped_labels": data.dropped,  # rows of the manifest left out by drop_labels, by label
        "dropped_missing": data.missing,  # rows of the manifest left out for an empty label cell (missing=drop)
        "n_test_images": scores.n_test_images,
        "metrics": _clean(scores.metrics),
        "baseline": _clean(scores.baseline),
        "classical": _clean(scores.classical),
        "folds": folds,
        "per_site": scores.per_site.to_dict(orient="records"),
        "weights": prep.report.summary(),
    }


def _prediction_table(df, y, idx, output, kind, fold, split) -> pd.DataFrame:
    keep = [c for c in ID_COLUMNS if c in df.columns]
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


def _correct_bias(val: pd.DataFrame, test: pd.DataFrame) -> BiasCorrection | None:
    """Brain-age bias correction fitted on this fold's validation predictions only, applied to both, and returned;
    left empty (NaN, None) when the validation set is too small (< 5) or its predictions carry no age trend to
    invert."""
    corr = BiasCorrection().fit(val["y_true"], val["y_pred"]) if len(val) >= 5 else None
    if corr is None or corr.slope < MIN_BIAS_SLOPE:
        val["y_pred_corrected"] = test["y_pred_corrected"] = np.nan
        return None
    val["y_pred_corrected"] = corr.apply(val["y_pred"])
    test["y_pred_corrected"] = corr.apply(test["y_pred"])
    return corr


def _decision_threshold(val: pd.DataFrame, test: pd.DataFrame, rule: str) -> float:
    """The fold's cut on ``prob_1`` for the threshold metrics (accuracy, sensitivity ...): ``youden`` fitted on
    its validation predictions (0.5 with fewer than 5 of them), or ``argmax`` (0.5); ROC-AUC ignores it."""
    cut = youden_threshold(val["y_true"], val["prob_1"]) if rule == "youden" and len(val) >= 5 else 0.5
    val["threshold"] = test["threshold"] = cut
    return cut


def _clean(metrics: dict) -> dict:
    return {k: (None if not np.isfinite(v) else float(v)) for k, v in metrics.items()}


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
