"""NIfTI loading, validation and the MONAI preprocessing pipeline that turns a file into a model input.

The pipeline (dictionary transforms on ``keys``, default ``("image",)``):
load (nibabel) -> channel first -> validate -> reorient to RAS -> resample to ``spacing`` -> crop to the
brain's bounding box (voxels > 0) -> pad/crop to ``shape`` around its centre -> intensity normalisation ->
float32 tensor.
Any failure raises ``DataError`` naming the file.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import NibabelReader
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ResizeWithPadOrCropd,
    Spacingd,
)

from common.errors import ConfigError, DataError

INTENSITY_MODES = ("zscore", "percentile", "none")
# nibabel's axis labels; passed explicitly so Orientationd does not depend on MONAI's changing default.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
# What build_preprocess does beyond PreprocessConfig's fields, as an export's config.json records it
# (common.export): a model's input is reproduced only if these steps are too.
PIPELINE = {
    "orientation": "RAS",  # Orientationd, before anything else
    "interpolation": "trilinear",  # Spacingd's "bilinear" on a 3D volume; zeros outside the image
    "pad_crop": "centred, zero padding",  # ResizeWithPadOrCropd to shape, after the foreground crop
    "intensity_mask": "non-zero voxels",  # zscore / percentile statistics over the brain only; 0 stays 0
}


@dataclass
class PreprocessConfig:
    """How a NIfTI file becomes a ``(1, D, H, W)`` model input; exports record it so fine-tunes match it."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # target voxel size in mm (R, A, S)
    shape: tuple[int, int, int] = (96, 96, 96)  # output (D, H, W); must equal the backbone's img_size
    intensity: str = "zscore"  # inside the non-zero brain: "zscore", or "percentile" (to [0, 1]); or "none"
    percentiles: tuple[float, float] = (0.5, 99.5)  # robust range for "percentile" (ignores hot voxels)
    crop_foreground: bool = True  # centre the brain's bounding box; off for volumes on a template grid

    def __post_init__(self) -> None:
        # OmegaConf hands lists back; keep the tuples the type says.
        self.spacing = tuple(float(s) for s in self.spacing)
        self.shape = tuple(int(s) for s in self.shape)
        self.percentiles = tuple(float(p) for p in self.percentiles)
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ConfigError(f"preprocess.spacing must be three positive mm values, got {self.spacing}")
        if len(self.shape) != 3 or min(self.shape) <= 0:
            raise ConfigError(f"preprocess.shape must be three positive sizes (D, H, W), got {self.shape}")
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(f"preprocess.intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        lo, hi = self.percentiles if len(self.percentiles) == 2 else (None, None)
        if lo is None or not 0 <= lo < hi <= 100:
            raise ConfigError(
                f"preprocess.percentiles must be (low, high) with 0 <= low < high <= 100, got {self.percentiles}"
            )

    def describe(self) -> dict[str, Any]:
        """The settings an export's metadata records (``spacing``, ``input_size``, ``intensity`` ...)."""
        return {
            "spacing": list(self.spacing),
            "input_size": list(self.shape),
            "intensity": self.intensity,
            "percentiles": list(self.percentiles),
            "crop_foreground": self.crop_foreground,
        }


def _source(value: Any) -> str:
    meta = getattr(value, "meta", None)
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    return "<in-memory volume>"


def check_volume(image: torch.Tensor | np.ndarray, source: str | Path) -> None:
    """Raise ``DataError`` naming ``source`` unless ``image`` is one finite, non-empty ``(1, D, H, W)``."""
    shape = tuple(image.shape)
    if len(shape) != 4:
        raise DataError(source, f"expected a 3D volume, got {len(shape) - 1}D data of shape {shape[1:]}")
    if shape[0] != 1:
        raise DataError(
            source,
            f"expected a 3D volume, got a 4D file with {shape[0]} volumes of shape "
            f"{shape[1:]}; split it or pick one volume",
        )
    if min(shape[1:]) < 2:
        raise DataError(source, f"expected a 3D volume, got shape {shape[1:]} with a flat axis")
    data = torch.as_tensor(image)
    if not torch.isfinite(data).all():
        bad = int((~torch.isfinite(data)).sum())
        raise DataError(source, f"contains {bad} NaN/Inf voxels")
    if not data.any():
        raise DataError(source, "is all zeros (an empty volume)")


class CheckVolumed(MapTransform):
    """Dictionary transform: ``check_volume`` on each key (after ``EnsureChannelFirstd``)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            check_volume(d[key], _source(d[key]))
        return d


class ScalePercentilesNonzerod(MapTransform):
    """Map the ``[lower, upper]`` percentiles of the non-zero (brain) voxels to [0, 1], clipped; 0 stays 0.

    MONAI's ``ScaleIntensityRangePercentilesd`` takes percentiles over the whole array, so the same brain
    would scale differently depending on how much background padding ``shape`` adds; this one does not.
    """

    def __init__(self, keys: Sequence[str], lower: float, upper: float):
        super().__init__(keys)
        self.lower, self.upper = lower, upper

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]  # (1, D, H, W)
            brain = image != 0
            lo, hi = np.percentile(image[brain].cpu().numpy(), [self.lower, self.upper])
            if hi <= lo:
                raise DataError(
                    _source(image),
                    f"has one intensity ({lo:g}) across the brain between "
                    f"percentiles {self.lower}-{self.upper}; it needs contrast",
                )
            d[key] = ((image - float(lo)) / float(hi - lo)).clamp(0.0, 1.0) * brain
        return d


class LoadNiftid(LoadImaged):
    """``LoadImaged`` with nibabel whose failures become a ``DataError`` naming the file."""

    def __init__(self, keys: Sequence[str], **kwargs: Any):
        super().__init__(keys, reader="NibabelReader", image_only=True, dtype=np.float32, **kwargs)
        # Passed at call time so MONAI tries nibabel only, not its PIL/NumPy fallbacks on a bad .nii.gz.
        self.nibabel = NibabelReader()

    def __call__(self, data, reader=None):
        for key in self.key_iterator(dict(data)):
            path = data[key]
            if isinstance(path, (str, Path)) and not Path(path).is_file():
                raise DataError(path, "no such image file")
        try:
            return super().__call__(data, reader or self.nibabel)
        except Exception as e:  # nibabel's ImageFileError, gzip/zlib errors, truncated data ...
            names = [str(data[k]) for k in self.key_iterator(dict(data))]
            raise DataError(", ".join(names), f"cannot be read as NIfTI ({type(e).__name__}: {e})") from e


class Preprocess(Compose):
    """A ``Compose`` that re-raises a step's ``DataError`` rather than MONAI's ``RuntimeError`` wrapper, and
    turns any other failure into a ``DataError`` naming the input file."""

    def __init__(self, transforms: Sequence[Any], keys: Sequence[str]):
        super().__init__(transforms)
        self.keys = tuple(keys)

    def __call__(self, data, *args, **kwargs):
        try:
            return super().__call__(data, *args, **kwargs)
        except Exception as e:
            cause: BaseException | None = e
            while cause is not None:
                if isinstance(cause, DataError):
                    raise cause from cause.__cause__  # the step's own error, without MONAI's wrapper
                cause = cause.__cause__
            root = e
            while root.__cause__ is not None:
                root = root.__cause__
            names = [str(data[k]) for k in self.keys if isinstance(data, Mapping) and k in data]
            problem = f"preprocessing failed ({type(root).__name__}: {root})"
            raise DataError(", ".join(names) or None, problem) from e


def build_preprocess(cfg: PreprocessConfig, keys: Sequence[str] = ("image",)) -> Preprocess:
    """The MONAI pipeline for ``cfg``: a dict ``{key: path}`` -> ``{key: float32 tensor (1, D, H, W)}``."""
    keys = tuple(keys)
    steps: list[Any] = [
        LoadNiftid(keys),
        EnsureChannelFirstd(keys),  # 3D -> (1, D, H, W); a 4D file's volumes -> channels (checked next)
        CheckVolumed(keys),
        Orientationd(keys, axcodes=PIPELINE["orientation"], labels=RAS_LABELS),
        Spacingd(keys, pixdim=cfg.spacing, mode="bilinear", padding_mode="zeros"),
    ]
    if cfg.crop_foreground:
        # Bounding box of voxels > 0 (the brain of a skull-stripped scan); each key cropped by its own box.
        steps += [CropForegroundd((k,), source_key=k, allow_smaller=True) for k in keys]
    steps.append(ResizeWithPadOrCropd(keys, spatial_size=cfg.shape))  # centred pad/crop: (1, *cfg.shape)
    if cfg.intensity == "zscore":
        steps.append(NormalizeIntensityd(keys, nonzero=True, channel_wise=True))
    elif cfg.intensity == "percentile":
        lo, hi = cfg.percentiles
        steps.append(ScalePercentilesNonzerod(keys, lower=lo, upper=hi))
    steps.append(EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False))
    return Preprocess(steps, keys)


def load_volume(path: str | Path, cfg: PreprocessConfig) -> torch.Tensor:
    """One NIfTI file preprocessed by ``cfg``: a float32 tensor ``(1, *cfg.shape)`` (RAS, cfg.spacing)."""
    return build_preprocess(cfg)({"image": str(path)})["image"]
