"""A fine-tuned model as an export folder (``common.export``): the backbone (``model.safetensors``, LoRA merged
into its weights), the head (``head.safetensors``) and, in ``config.json``, everything that turns a scan into a
prediction: the preprocessing, the task with its class names, the decision threshold or the brain-age bias
correction, how the head's outputs are decoded, and the precision it ran in.

``finetune run`` writes one per fold (``model/`` for a single fold, ``fold{k}/model/`` for several);
``finetune predict`` reads them (``read_model_folder``, ``model_folders``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from common.checkpoint import load_export, load_state_dict_strict
from common.data import PreprocessConfig
from common.errors import CheckpointError
from common.export import CONFIG, data_summary, export_folder
from finetune.heads import FineTuneModel, LinearHead

MODEL_DIR = "model"
FOLD_DIR = re.compile(r"fold(\d+)")
LICENSE = "other"  # fine-tuned on a task manifest whose images' terms this package cannot know


def model_dir(run: Path, fold: int, n_folds: int) -> Path:
    """Where a run folder keeps the model of ``fold``: ``model/`` when the run has one fold, else ``foldK/model/``."""
    return run / MODEL_DIR if n_folds == 1 else run / f"fold{fold}" / MODEL_DIR


def write_model_folder(
    folder: Path, model: FineTuneModel, preprocess: PreprocessConfig, task: dict, provenance: dict, train: pd.DataFrame
) -> Path:
    """Write ``model`` (backbone + head, eval) as an export folder; ``task`` holds what decodes its outputs
    (``name``, ``kind``, ``column``, ``classes``, ``target_mean``, ``target_std``, ``threshold`` or
    ``bias_correction``, ``precision``), ``provenance`` how it was trained, ``train`` its training rows (their
    summary goes on the card)."""
    head = model.head
    norm = "batch" if isinstance(head.norm, nn.BatchNorm1d) else "none"
    dtype = str(head.fc.weight.dtype).removeprefix("torch.")
    task = {**task, "head": {"norm": norm, "out_dim": head.fc.out_features, "dtype": dtype}}
    meta = {
        **preprocess.describe(),
        "task": task,
        **provenance,
        "training_data": {"task manifest (this fold's training rows)": data_summary(train)},
        "license": LICENSE,
    }
    return export_folder(model.backbone, folder, meta, head=head.state_dict())


@dataclass
class FineTuned:
    """A model folder read back: the model in eval mode, its ``config.json`` and its preprocessing."""

    folder: Path
    model: FineTuneModel
    config: dict
    preprocess: PreprocessConfig

    @property
    def task(self) -> dict:
        return self.config["task"]


def read_model_folder(folder: str | Path) -> FineTuned:
    """Rebuild the backbone (``common.checkpoint.load_export``, strict) and the head of a model folder."""
    folder = Path(folder)
    config = read_config(folder)
    if "task" not in config:
        raise CheckpointError(
            f"{folder}: an encoder export without a task head; predict takes a fine-tuned model folder "
            f"(`finetune run` writes {MODEL_DIR}/ or fold{{k}}/{MODEL_DIR}/ in its run folder) or a run folder"
        )
    backbone, _ = load_export(folder)
    spec = config["task"]["head"]
    path = folder / config["head"]
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the task head ({e})") from e
    head = LinearHead(backbone.feature_dim, spec["out_dim"], norm=spec["norm"]).to(state["fc.weight"].dtype)
    load_state_dict_strict(head, state, path)
    model = FineTuneModel(backbone, spec["out_dim"], head=head)
    pre = config["preprocessing"]
    preprocess = PreprocessConfig(
        spacing=pre["spacing"],
        shape=pre["shape"],
        intensity=pre["intensity"],
        crop_foreground=pre["crop_foreground"],
        **({"percentiles": pre["percentiles"]} if pre.get("percentiles") else {}),
    )
    return FineTuned(folder, model.eval(), config, preprocess)


def model_folders(path: str | Path) -> list[Path]:
    """The model folders ``path`` names: itself, or a run folder's ``model/`` or ``fold{k}/model/`` (by fold)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder; give a model folder or a `finetune run` folder")
    if (path / CONFIG).is_file():
        return [path]
    if (path / MODEL_DIR / CONFIG).is_file():
        return [path / MODEL_DIR]
    folds = [p.parent for p in path.glob(f"fold*/{MODEL_DIR}/{CONFIG}") if FOLD_DIR.fullmatch(p.parent.parent.name)]
    if not folds:
        raise CheckpointError(
            f"{path}: neither a model folder ({CONFIG}) nor a run folder with {MODEL_DIR}/ or fold{{k}}/{MODEL_DIR}/; "
            "runs from before models were saved have none: run the cell again"
        )
    return sorted(folds, key=lambda p: int(FOLD_DIR.fullmatch(p.parent.name).group(1)))


def read_config(folder: Path) -> dict:
    """A model folder's ``config.json``."""
    try:
        return json.loads((folder / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / CONFIG}: cannot read the model's config ({e})") from e
