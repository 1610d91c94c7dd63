"""A MONAI dictionary ``Dataset`` over a manifest: preprocessed volumes with their label and subject."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from monai.data import Dataset

from common.data.volume import PreprocessConfig, build_preprocess
from common.errors import DataError


def _label_dtype(df: pd.DataFrame, column: str) -> torch.dtype:
    values = df[column]
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_integer_dtype(values):
        return torch.long
    if pd.api.types.is_float_dtype(values):
        return torch.float32
    raise DataError(
        None,
        f"label column {column!r} holds {values.dtype} values; map class names to integers "
        "(e.g. df[column].map({'CN': 0, 'AD': 1})) before building the dataset",
    )


class ManifestDataset(Dataset):
    """Items ``{"image": (1, D, H, W) float32, "label": scalar tensor, "subject_id": str, "path": str}``.

    ``df`` is a manifest from ``read_manifest``; ``label_column`` an integer column (classes -> ``long``) or a
    float column (regression -> ``float32``), or None for unlabelled pre-training data (no ``label`` key).
    ``transform`` (e.g. augmentations) runs after preprocessing. A bad file raises ``DataError`` naming it;
    training loops decide whether to skip it.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        cfg: PreprocessConfig,
        label_column: str | None = None,
        transform: Callable[[dict], dict] | None = None,
    ):
        if "path" not in df.columns:
            raise DataError(None, "the manifest DataFrame has no 'path' column; read it with read_manifest")
        items: list[dict[str, Any]] = [
            {"image": p, "path": p, "subject_id": str(s)}
            for p, s in zip(df["path"], df["subject_id"] if "subject_id" in df.columns else df["path"])
        ]
        if label_column is not None:
            if label_column not in df.columns:
                raise DataError(
                    None,
                    f"label column {label_column!r} is not in the manifest "
                    f"(columns: {', '.join(map(str, df.columns))})",
                )
            dtype = _label_dtype(df, label_column)
            missing = df.index[df[label_column].isna()]
            if len(missing):
                raise DataError(
                    df["path"][missing[0]],
                    f"has no {label_column!r} label ({len(missing)} rows of the manifest lack one)",
                )
            for item, value in zip(items, df[label_column]):
                item["label"] = torch.tensor(value, dtype=dtype)
        self.cfg = cfg
        self.label_column = label_column
        self.preprocess = build_preprocess(cfg, keys=("image",))
        self.augment = transform
        super().__init__(items, transform=None)

    def _transform(self, index: int) -> dict[str, Any]:
        # Not one Compose: MONAI would wrap the preprocessing DataError in a RuntimeError, and an error in the
        # caller's transform is a bug to surface as is, not a bad file to skip.
        item = self.preprocess(dict(self.data[index]))
        return self.augment(item) if self.augment is not None else item
