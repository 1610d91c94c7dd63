"""``python -m finetune predict``: fine-tuned models applied to new scans.

``--model`` is a model folder (``finetune.model_folder``) or a ``finetune run`` folder: its ``model/``, or every
``fold{k}/model/``, whose outputs are averaged. Each scan of ``--manifest`` is preprocessed as the models'
``config.json`` says, and each model computes as its fold did in the run (the same code, in the precision it ran
in), so on the run's own test rows the output equals its ``predictions.csv``. One row per scan: the manifest's
identifiers, ``y_true`` where the manifest has the task's column, then the probabilities, the decision threshold
and the ``predicted`` class, or the prediction and its bias-corrected value.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.data import ManifestDataset, PreprocessConfig, read_manifest
from common.errors import CheckpointError
from common.io import atomic_write_text
from common.precision import resolve_device
from finetune.metrics import BiasCorrection
from finetune.model_folder import FineTuned, model_folders, read_config, read_model_folder
from finetune.modes.full import predict as model_outputs
from finetune.modes.linear_probe import extract_features
from finetune.run import ID_COLUMNS

log = logging.getLogger(__name__)


def predict_manifest(
    model: str | Path, manifest: str | Path, device: str = "auto", batch_size: int = 4
) -> pd.DataFrame:
    """The predictions table of ``manifest``'s scans by the model folder(s) ``model`` names (their mean)."""
    models = [read_model_folder(folder) for folder in model_folders(model)]
    _check_alike(models)
    df = read_manifest(manifest, required=("path", "subject_id"), check_files=True)
    volumes = load_scans(df, models[0].preprocess)
    target = resolve_device(device, key="--device")
    outputs = [fold_outputs(m, volumes, batch_size, target) for m in models]
    table = df[[c for c in ID_COLUMNS if c in df.columns]].reset_index(drop=True)
    task = models[0].task
    if task["column"] in df.columns:
        table["y_true"] = _labels(df[task["column"]], task)
    for column in outputs[0]:
        table[column] = np.mean([out[column] for out in outputs], axis=0)  # one model: its own values
    if task["classes"]:
        table["predicted"] = _decide(table, task["classes"])
    log.info("%s: %d scans, the mean of %d model(s) from %s", manifest, len(table), len(models), model)
    return table


def load_scans(df: pd.DataFrame, preprocess: PreprocessConfig) -> torch.Tensor:
    """(N, 1, D, H, W): each row's image through the model's preprocessing, as the run read its volumes."""
    dataset = ManifestDataset(df[["path", "subject_id"]], preprocess)
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


@torch.no_grad()
def fold_outputs(fitted: FineTuned, volumes: torch.Tensor, batch_size: int, device: torch.device) -> dict:
    """One model's columns for ``volumes``: ``prob_{c}`` (+ ``threshold``), or ``y_pred`` and ``y_pred_corrected``."""
    task, model = fitted.task, fitted.model.to(device)
    precision = task["precision"]
    if model.head.fc.weight.dtype == torch.float64:  # the linear probe: frozen features, then its float64 model
        features = extract_features(model.backbone, volumes, batch_size, device, precision)
        out = model.head.cpu()(features.double())
    else:  # a trained head runs inside the model, as in the run's predictions
        out = model_outputs(model, volumes, np.arange(len(volumes)), batch_size, device, precision)
    n = len(volumes)
    if task["kind"] == "classification":
        probs = torch.softmax(out, dim=1).numpy()
        columns = {f"prob_{c}": probs[:, c] for c in range(probs.shape[1])}
        if task.get("threshold") is not None:
            columns["threshold"] = np.full(n, task["threshold"])
        return columns
    y_pred = out[:, 0].numpy() * task["target_std"] + task["target_mean"]
    bias = task.get("bias_correction")
    if bias is None:
        return {"y_pred": y_pred, "y_pred_corrected": np.full(n, np.nan)}
    corr = BiasCorrection()
    corr.slope, corr.intercept = bias["slope"], bias["intercept"]
    return {"y_pred": y_pred, "y_pred_corrected": corr.apply(y_pred)}


def describe(model: str | Path) -> dict:
    """What ``predict`` would apply, read from the models' ``config.json`` (no weights): for ``--print-config``."""
    folders = model_folders(model)
    config = read_config(folders[0])
    return {"models": [str(f) for f in folders], "task": config.get("task"), "preprocessing": config["preprocessing"]}


def write_predictions(table: pd.DataFrame, out: str | Path) -> Path:
    """``out`` as CSV, atomically (a reader never sees half a file)."""
    return atomic_write_text(out, table.to_csv(index=False))


def _check_alike(models: list[FineTuned]) -> None:
    """The folds of one run share task and preprocessing; models that do not cannot be averaged."""
    first = models[0]
    for other in models[1:]:
        for what, a, b in (
            ("task", _task_identity(first), _task_identity(other)),
            ("preprocessing", first.preprocess, other.preprocess),
        ):
            if a != b:
                raise CheckpointError(
                    f"{other.folder}: its {what} differs from {first.folder}'s ({b} vs {a}); predict averages the "
                    "folds of one run only: give one model folder"
                )


def _task_identity(fitted: FineTuned) -> tuple:
    task = fitted.task
    return task["name"], task["kind"], task["column"], tuple(task["classes"] or ())


def _labels(values: pd.Series, task: dict) -> pd.Series:
    """The manifest's labels as the run's ``y_true``: class indices, or numbers; unknown or empty: NaN."""
    if task["classes"]:
        index = {c: i for i, c in enumerate(task["classes"])}
        labels = values.astype("string").map(index).astype("Float64")
        return labels.astype("Int64") if labels.notna().all() else labels
    return pd.to_numeric(values, errors="coerce")


def _decide(table: pd.DataFrame, classes: list[str]) -> pd.Series:
    """The class each scan is assigned: ``prob_1`` above the threshold (binary), else the most probable class."""
    probs = table[[f"prob_{c}" for c in range(len(classes))]].to_numpy()
    if "threshold" in table:
        chosen = (table["prob_1"] > table["threshold"]).to_numpy(int)
    else:
        chosen = probs.argmax(axis=1)
    return pd.Series(np.asarray(classes)[chosen], index=table.index)
