"""Synthetic brain MRI: generated on the fly by ``synth`` (subject ``position`` of the pre-training corpus),
or read from a directory that ``python -m synth`` wrote; fitted to ``input_size`` by a random crop (axes
larger than it) and centred zero padding (axes smaller)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Compose, EnsureType, RandSpatialCrop, SpatialPad

from common.config import load_config, to_object
from common.errors import ConfigError
from pretrain.corpora.stream import file_at
from synth.anatomy import anatomy_at
from synth.atrophy import atrophy_basis
from synth.config import SynthConfig
from synth.dataset import GeneratedDirectory
from synth.generator import Generator
from synth.subject import corpus_plan


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


class SynthMRISource:
    """``(1, *input_size)`` synthetic T1w volumes in [0, 1]."""

    name = "synthmri"
    covariates = ("age",)  # what covariate() can give (pretrain.config.CORPUS_COVARIATES)

    def __init__(self, cfg, input_size: Sequence[int], spacing: Sequence[float], seed: int = 0):
        self.fit = fit_transform(input_size)
        self.seed = seed
        self.directory = cfg.directory
        if cfg.directory is not None:
            self.files = GeneratedDirectory(cfg.directory)
            self.generator = None
        else:
            self.synth_cfg = synth_config(cfg, spacing)
            self.generator = Generator(self.synth_cfg)
            # build synth's template resamples now, so forked DataLoader workers share them
            anatomy_at(self.synth_cfg.spacing)
            atrophy_basis(self.synth_cfg.nonlinear.grid_lattice_mm)

    def _volume(self, position: int) -> torch.Tensor:
        if self.generator is None:
            return self.files[file_at(position, len(self.files), self.seed)]
        return self.generator(corpus_plan(self.synth_cfg, self.seed, position)).image  # (1, D, H, W)

    def covariate(self, position: int, name: str) -> float:
        """The item's ``name`` (``age``): from synth's subject plan, or the directory's manifest."""
        if self.generator is None:
            return float(self.files.table[name].iloc[file_at(position, len(self.files), self.seed)])
        return float(getattr(corpus_plan(self.synth_cfg, self.seed, position), name))

    def item(self, position: int, rng: np.random.Generator) -> torch.Tensor:
        volume = self._volume(position)
        self.fit.set_random_state(seed=int(rng.integers(2**31)))
        return torch.as_tensor(self.fit(volume)).contiguous()
