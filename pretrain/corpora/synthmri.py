"""Synthetic brain MRI: generated on the fly by ``synth`` (the subject at ``position`` of ``SyntheticMRIStream``,
by its seeding rule), or read from a directory that ``python -m synth`` wrote; fitted to ``input_size`` by a
random crop (axes larger than it) and centred zero padding (axes smaller)."""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, EnsureType, RandSpatialCrop, SpatialPad

from common.config import load_config, to_object
from common.errors import ConfigError, DataError
from pretrain.corpora.stream import file_at
from synth.config import SynthConfig
from synth.dataset import GeneratedDirectory, SyntheticMRIStream


def fit_transform(input_size: Sequence[int]) -> Compose:
    size = [int(s) for s in input_size]
    return Compose(
        [
            RandSpatialCrop(roi_size=size, random_center=True, random_size=False),  # no-op on axes <= size
            SpatialPad(spatial_size=size),  # centred zeros on axes < size
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def synth_config(cfg, spacing: Sequence[float]):
    """synth's ``SynthConfig`` from ``data.synthmri`` (file + overrides), at the run's (isotropic) spacing."""
    if len(set(float(s) for s in spacing)) != 1:
        raise ConfigError(f"corpus synthmri generates isotropic volumes; data.spacing {list(spacing)} is not")
    scfg = load_config(SynthConfig, cfg.synth_config, list(cfg.overrides))
    if scfg.spacing != SynthConfig.spacing and float(scfg.spacing) != float(spacing[0]):
        raise ConfigError(
            f"data.synthmri sets synth spacing {scfg.spacing} mm but data.spacing is "
            f"{list(spacing)}; set data.spacing only"
        )
    scfg.spacing = float(spacing[0])
    return to_object(scfg)


def _check_spacing(files: GeneratedDirectory, spacing: Sequence[float]) -> None:
    """A folder's volumes are read as written (never resampled): they must be at ``data.spacing``, or the export
    would record a voxel size its encoder never saw."""
    if not len(files):
        return
    path = files.directory / files.table["path"].iloc[0]
    try:
        zooms = [float(z) for z in nib.load(path).header.get_zooms()[:3]]
    except Exception as e:
        raise DataError(path, f"cannot be read as NIfTI ({e})") from None
    if not np.allclose(zooms, [float(s) for s in spacing], rtol=1e-3):
        raise ConfigError(
            f"data.synthmri.directory {files.directory} holds volumes at {zooms} mm (e.g. {path.name}) but "
            f"data.spacing is {list(spacing)}; set data.spacing to the folder's, or generate it at that spacing"
        )


class SynthMRISource:
    """``(1, *input_size)`` synthetic T1w volumes in [0, 1]."""

    name = "synthmri"
    covariates = ("age",)  # what covariate() can give (registered in pretrain.corpora.CORPORA)

    def __init__(self, cfg, input_size: Sequence[int], spacing: Sequence[float], seed: int = 0):
        self.fit = fit_transform(input_size)
        self.seed = seed
        self.directory = cfg.directory
        self.subjects: SyntheticMRIStream | None = None  # on the fly; None: the directory's files
        if cfg.directory is not None:
            self.files = GeneratedDirectory(cfg.directory)
            _check_spacing(self.files, spacing)
        else:
            self.synth_cfg = synth_config(cfg, spacing)
            self.subjects = SyntheticMRIStream(self.synth_cfg, seed)  # synth's caches built now: workers share them

    def _volume(self, position: int) -> torch.Tensor:
        if self.subjects is None:
            return self.files[file_at(position, len(self.files), self.seed)]
        return self.subjects.volume(position)  # (1, D, H, W)

    def covariate(self, position: int, name: str) -> float:
        """The item's ``name`` (``age``): from synth's subject plan, or the directory's manifest."""
        if self.subjects is None:
            return float(self.files.table[name].iloc[file_at(position, len(self.files), self.seed)])
        return float(getattr(self.subjects.plan(position), name))

    def fitted(self, volume: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """``volume`` ``(1, D, H, W)`` cropped/padded to ``(1, *input_size)`` by ``rng``'s crop."""
        self.fit.set_random_state(seed=int(rng.integers(2**31)))
        return torch.as_tensor(self.fit(volume)).contiguous()

    def item(self, position: int, rng: np.random.Generator) -> torch.Tensor:
        return self.fitted(self._volume(position), rng)
