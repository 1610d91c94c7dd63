"""A weighted mixture of corpora: each item's corpus is drawn from the weights with the item's own generator."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from omegaconf import OmegaConf

from common.errors import ConfigError


def mixture_weights(mixed) -> dict[str, float]:
    """``data.mixed`` as {corpus: sampling weight}: ``MixedConfig``'s fields are the one list of the corpora a
    mixture can draw from (a config node or the dataclass itself)."""
    return {name: float(weight) for name, weight in OmegaConf.create(mixed).items()}


class MixedSource:
    name = "mixed"

    def __init__(self, sources: Mapping[str, object], weights: Mapping[str, float]):
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ConfigError(f"data.mixed weights must be >= 0 with a positive sum, got {dict(weights)}")
        self.sources = [sources[k] for k, w in weights.items() if w > 0]
        total = sum(w for w in weights.values() if w > 0)
        self.probs = np.array([w / total for w in weights.values() if w > 0])

    def item(self, position: int, rng: np.random.Generator) -> torch.Tensor:
        source = self.sources[int(rng.choice(len(self.sources), p=self.probs))]
        return source.item(position, rng)
