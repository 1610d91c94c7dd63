"""Packed shards (``python -m pretrain.pack``): volumes already preprocessed to the model's grid, read
memory-mapped; an item is a random ``input_size`` crop (only its bytes are read) and random flips."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from common.data.packed import PackedVolumes
from common.errors import ConfigError
from pretrain.corpora.stream import file_at


class PackedSource:
    """``(1, *input_size)`` float32 crops of packed volumes (intensity as packed: see ``pack.json``)."""

    name = "packed"

    def __init__(self, cfg, input_size: Sequence[int], spacing: Sequence[float], seed: int = 0):
        if cfg.directory is None:
            raise ConfigError("corpus packed needs data.packed.directory (a folder written by python -m pretrain.pack)")
        self.volumes = PackedVolumes(cfg.directory)
        packed = self.volumes.preprocess
        if not np.allclose(packed.spacing, [float(s) for s in spacing]):
            raise ConfigError(
                f"{cfg.directory} was packed at spacing {list(packed.spacing)} mm but data.spacing is "
                f"{list(spacing)}; set data.spacing to the pack's or pack again"
            )
        self.size = np.array([int(s) for s in input_size])
        self.slack = np.array(packed.shape) - self.size  # room for the random crop, per axis
        if (self.slack < 0).any():
            raise ConfigError(
                f"{cfg.directory} holds {list(packed.shape)} volumes, smaller than data.shape "
                f"{list(input_size)}; pack with a --shape at least that large"
            )
        self.flip_prob = float(cfg.flip_prob)
        self.seed = seed

    def item(self, position: int, rng: np.random.Generator) -> torch.Tensor:
        index = file_at(position, len(self.volumes), self.seed)
        start = rng.integers(0, self.slack + 1)  # (3,) per-axis crop origin
        volume = self.volumes.crop(index, start, self.size)  # (1, *input_size)
        axes = [axis + 1 for axis in range(3) if rng.random() < self.flip_prob]
        return volume.flip(axes) if axes else volume
