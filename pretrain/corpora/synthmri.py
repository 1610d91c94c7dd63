"""Synthetic brain MRI: generated on the fly by ``synth`` (the subject at ``position`` of ``SyntheticMRIStream``,
by its seeding rule), or read from a directory that ``python -m synth`` wrote; fitted to ``input_size`` by a
random crop (axes larger than it) and centred zero padding (axes smaller).

An item is a subject: from a directory, subjects are visited in a fresh random order every epoch and the item is
one of the subject's renderings (``generate --renderings K``), drawn by the item's generator, so over the epochs
every file is seen. ``pair`` gives two renderings of one subject, the same anatomy by two scanners, for rescan
views (``objective.contrastive.views=rescan``): on the fly, renderings 0 and 1 of the position's subject."""

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
    """``(1, *input_size)`` synthetic T1w volumes in [0, 1]; ``rescan``: the run asks for ``pair``s, so a
    directory must hold two renderings of every subject (checked here, before anything runs)."""

    name = "synthmri"
    covariates = ("age",)  # what covariate() can give (registered in pretrain.corpora.CORPORA)

    def __init__(self, cfg, input_size: Sequence[int], spacing: Sequence[float], seed: int = 0, rescan: bool = False):
        self.fit = fit_transform(input_size)
        self.seed = seed
        self.directory = cfg.directory
        self.subjects: SyntheticMRIStream | None = None  # on the fly; None: the directory's files
        if cfg.directory is not None:
            self.files = GeneratedDirectory(cfg.directory)
            _check_spacing(self.files, spacing)
            if rescan and self.files.renderings < 2:
                raise ConfigError(
                    f"objective.contrastive.views=rescan needs two renderings of each subject, but "
                    f"data.synthmri.directory {self.files.directory} holds {self.files.renderings} per subject; "
                    "make it with `python -m synth generate ... --renderings 2` (or more), or use views=augment"
                )
        else:
            self.synth_cfg = synth_config(cfg, spacing)
            self.subjects = SyntheticMRIStream(self.synth_cfg, seed)  # synth's caches built now: workers share them

    def _rows(self, position: int) -> list[int]:
        """The directory's manifest rows of the subject at ``position``: its renderings."""
        return self.files.subject_rows[file_at(position, len(self.files.subject_rows), self.seed)]

    def covariate(self, position: int, name: str) -> float:
        """The item's ``name`` (``age``): from synth's subject plan, or the directory's manifest."""
        if self.subjects is None:
            return float(self.files.table[name].iloc[self._rows(position)[0]])
        return float(getattr(self.subjects.plan(position), name))

    def subject(self, position: int) -> str:
        """Whose image the item is: synth's subject id, from the plan or the directory's manifest."""
        if self.subjects is None:
            return str(self.files.table["subject_id"].iloc[self._rows(position)[0]])
        return self.subjects.plan(position).subject_id

    def fitted(self, volume: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """``volume`` ``(1, D, H, W)`` cropped/padded to ``(1, *input_size)`` by ``rng``'s crop."""
        return self._fit(volume, int(rng.integers(2**31)))

    def _fit(self, volume: torch.Tensor, seed: int) -> torch.Tensor:
        self.fit.set_random_state(seed=seed)
        return torch.as_tensor(self.fit(volume)).contiguous()

    def item(self, position: int, rng: np.random.Generator) -> torch.Tensor:
        if self.subjects is None:
            rows = self._rows(position)
            volume = self.files[rows[int(rng.integers(len(rows)))]]  # one rendering: no draw, as before renderings
        else:
            volume = self.subjects.volume(position)  # (1, D, H, W)
        return self.fitted(volume, rng)

    def pair(self, position: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Two renderings of the subject at ``position`` (a directory's: two of its K, drawn by ``rng``), fitted
        by one crop, so that they show the same anatomy: ``(1, *input_size)`` each."""
        if self.subjects is None:
            rows = self._rows(position)
            first, second = (rows[int(i)] for i in rng.choice(len(rows), size=2, replace=False))
            volumes = self.files[first], self.files[second]
        else:
            volumes = self.subjects.volume(position), self.subjects.volume(position, 1)
        seed = int(rng.integers(2**31))
        return self._fit(volumes[0], seed), self._fit(volumes[1], seed)
