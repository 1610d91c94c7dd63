"""Medical images: NIfTI files from a manifest or a directory, preprocessed by common's pipeline, then random
``input_size`` crops and flips."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.transforms import Compose, EnsureType, RandFlip, RandSpatialCrop

from common.data import PreprocessConfig, build_preprocess, read_manifest
from common.errors import ConfigError, DataError
from pretrain.corpora.stream import file_at

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def find_nifti(directory: str | Path) -> list[Path]:
    """``*.nii`` / ``*.nii.gz`` files under ``directory`` (recursively), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(directory, "medical image directory does not exist")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise DataError(directory, "no NIfTI files (*.nii, *.nii.gz) found in this directory or below it")
    return files


class MedicalSource:
    """Preprocessed ``(1, *input_size)`` volumes; items are random crops of ``crop_from``-sized volumes."""

    name = "medical"

    def __init__(self, cfg, input_size: Sequence[int], spacing: Sequence[float], seed: int = 0):
        if (cfg.manifest is None) == (cfg.directory is None):
            raise ConfigError(
                "corpus medical needs exactly one of data.medical.manifest (CSV) or "
                "data.medical.directory (NIfTI folder)"
            )
        self.table = None  # the manifest's rows: covariates by column
        if cfg.manifest is not None:
            self.table = read_manifest(cfg.manifest, required=("path",), check_files=False)
            self.files = [Path(p) for p in self.table["path"]]
        else:
            self.files = find_nifti(cfg.directory)
        # what covariate() can give: the manifest's covariate columns (registered in pretrain.corpora.CORPORA)
        self.covariates = tuple(c for c in ("age",) if self.table is not None and c in self.table.columns)
        self.manifest = cfg.manifest
        crop_from = list(cfg.crop_from) if cfg.crop_from is not None else list(input_size)
        if any(c < s for c, s in zip(crop_from, input_size)):
            raise ConfigError(
                f"data.medical.crop_from {crop_from} must be at least data.shape {list(input_size)} on every axis"
            )
        self.preprocess_cfg = PreprocessConfig(spacing=tuple(spacing), shape=tuple(crop_from), intensity=cfg.intensity)
        self.preprocess = build_preprocess(self.preprocess_cfg)
        self.augment = Compose(
            [
                RandSpatialCrop(roi_size=[int(s) for s in input_size], random_center=True, random_size=False),
                *[RandFlip(prob=cfg.flip_prob, spatial_axis=axis) for axis in range(3)],
                EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
            ]
        )
        self.seed = seed

    def keep_items_with(self, names: Sequence[str]) -> None:
        """Drop the manifest rows whose ``names`` (``age``) are empty or not finite numbers, logging how many,
        so that every item a stream reads has them; a ``DataError`` if no row is left."""
        if self.table is None or not names:
            return
        values = self.table[list(names)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
        keep = np.isfinite(values).all(axis=1)
        if keep.all():
            return
        dropped, total = int((~keep).sum()), len(keep)
        if not keep.any():
            raise DataError(
                self.manifest, f"no row has a number in {', '.join(names)}: the objective needs it for every item"
            )
        log.warning(
            "%s: %d of %d rows dropped: %s empty or not a number (the objective needs it for every item)",
            self.manifest,
            dropped,
            total,
            ", ".join(names),
        )
        self.table = self.table[keep].reset_index(drop=True)
        self.files = [Path(p) for p in self.table["path"]]

    def covariate(self, position: int, name: str) -> float:
        """The item's ``name`` (``age``) from the manifest's column; an item without one is a ``DataError``
        (``keep_items_with`` drops such rows up front; were one left, the stream would skip it as a bad item)."""
        if self.table is None or name not in self.table.columns:
            raise DataError(self.manifest or self.files[0].parent, f"no {name!r} column: the items carry no {name}")
        row = file_at(position, len(self.files), self.seed)
        value = pd.to_numeric(self.table[name].iloc[row], errors="coerce")
        if not np.isfinite(value):
            raise DataError(self.files[row], f"{self.manifest}: {name} {self.table[name].iloc[row]!r} is not a number")
        return float(value)

    def subject(self, position: int) -> str:
        """Whose image the item is: the manifest's ``subject_id`` (one label for all of a subject's sessions), or
        the file's path where the row has none."""
        row = file_at(position, len(self.files), self.seed)
        subject = self.table["subject_id"].iloc[row] if self.table is not None and "subject_id" in self.table else None
        return str(subject) if pd.notna(subject) else str(self.files[row])

    def item(self, position: int, rng: np.random.Generator) -> torch.Tensor:
        path = self.files[file_at(position, len(self.files), self.seed)]
        volume = self.preprocess({"image": str(path)})["image"]  # (1, *crop_from); DataError if unreadable
        self.augment.set_random_state(seed=int(rng.integers(2**31)))
        return torch.as_tensor(self.augment(volume)).contiguous()  # (1, *input_size)
