"""Synthetic MRI generated in the training process, a batch at a time, on the training device
(``data.synthmri.device: auto|cpu|cuda``; ``cpu`` keeps the DataLoader-worker path of ``synthmri.py``).

Batch ``j`` of rank ``r`` holds the corpus positions ``stream.batch_positions`` gives, as on the worker path
(whatever its worker count), so ranks never repeat each other; a batch is ``synth``'s ``Generator.batch`` of
those positions' subjects, fitted to ``input_size`` by the same seeded crop/pad as the
worker path. Batches carry the trainer's bookkeeping fields, so resuming is exact as for any corpus.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from common.errors import ConfigError
from common.precision import DEVICES
from pretrain.corpora.stream import batch_positions
from pretrain.corpora.synthmri import SynthMRISource


def generation_device(setting: str, training_device: torch.device) -> torch.device | None:
    """Where ``synthmri`` generates: None for the DataLoader workers (``cpu``), else the training device."""
    if setting not in DEVICES:
        raise ConfigError(f"data.synthmri.device must be one of {', '.join(DEVICES)}, got {setting!r}")
    if setting == "cpu" or (setting == "auto" and training_device.type != "cuda"):
        return None
    if training_device.type != "cuda":
        raise ConfigError(f"data.synthmri.device=cuda but the run trains on {training_device.type}; use auto or cpu")
    return training_device


class DeviceSynthStream:
    """Endless batches ``{"image": (B, 1, *input_size)}`` on ``device`` for one rank, from batch ``start``."""

    def __init__(
        self,
        source: SynthMRISource,
        seed: int,
        rank: int,
        world_size: int,
        batch_size: int,
        device: torch.device,
        start: int = 0,
    ):
        if source.generator is None:
            raise ConfigError("data.synthmri.device generates on the fly; it cannot read data.synthmri.directory")
        self.source, self.seed, self.rank, self.world = source, seed, rank, world_size
        self.batch_size, self.device, self.start = batch_size, torch.device(device), start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from synth.subject import corpus_plan

        j = self.start
        while True:
            positions = batch_positions(self.rank, self.world, self.batch_size, j)
            plans = [corpus_plan(self.source.synth_cfg, self.seed, p) for p in positions]
            volumes = self.source.generator.batch(plans, self.device)  # (B, 1, D, H, W) on the device
            images = []
            for volume, position in zip(volumes, positions):
                rng = np.random.default_rng([self.seed, position])  # as CorpusStream seeds an item
                self.source.fit.set_random_state(seed=int(rng.integers(2**31)))
                images.append(torch.as_tensor(self.source.fit(volume)))
            n = len(positions)
            yield {
                "image": torch.stack(images).contiguous(),  # (B, 1, *input_size)
                "_batch": torch.full((n,), j, dtype=torch.long),
                "_skipped": torch.zeros(n, dtype=torch.long),
            }
            j += 1
