"""Synthetic MRI generated in the training process, a batch at a time, on the training device
(``data.synthmri.device: auto|cpu|cuda``; ``cpu`` keeps the DataLoader-worker path of ``synthmri.py``).

Batches come from ``synth``'s ``SyntheticMRIStream`` with a device: the same seeding and order as the worker
path (batch ``j`` of rank ``r`` holds the same positions' subjects, whatever the worker path's worker count), so
ranks never repeat each other; each volume is fitted to ``input_size`` by the crop the worker path draws for its
position. Batches carry the trainer's bookkeeping fields, so resuming is exact as for any corpus.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from common.errors import ConfigError
from common.precision import DEVICES
from pretrain.corpora.synthmri import SynthMRISource
from synth.dataset import SyntheticMRIStream


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
        if source.subjects is None:
            raise ConfigError("data.synthmri.device generates on the fly; it cannot read data.synthmri.directory")
        self.source, self.seed, self.start = source, seed, start
        self.stream = SyntheticMRIStream(
            source.synth_cfg, seed, batch_size=batch_size, rank=rank, world_size=world_size, start=start, device=device
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for j, batch in enumerate(self.stream, self.start):  # in this process: batches start, start + 1, ...
            images = [
                self.source.fitted(volume, np.random.default_rng([self.seed, int(position)]))  # as CorpusStream
                for volume, position in zip(batch["image"], batch["position"])
            ]
            n = len(images)
            yield {
                "image": torch.stack(images),  # (B, 1, *input_size) on the device
                "_batch": torch.full((n,), j, dtype=torch.long),
                "_skipped": torch.zeros(n, dtype=torch.long),
            }
