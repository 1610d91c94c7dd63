"""The learning-rate schedule both training loops use: linear warm-up, then cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """``LambdaLR`` factor of step ``s`` (0-based: the first optimizer step is 0): ``(s + 1) / warmup_steps``
    during warm-up, so the first step already trains, then cosine 1 -> ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return factor
