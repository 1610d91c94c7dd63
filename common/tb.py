"""Logging: a TensorBoard writer that only rank 0 writes, and tqdm progress shown on rank 0 only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from common.distributed import is_rank_zero


class RankZeroWriter:
    """``torch.utils.tensorboard.SummaryWriter`` on rank 0; every call is a no-op on other ranks."""

    def __init__(self, logdir: str | Path, **kwargs: Any):
        self.enabled = is_rank_zero()
        self._writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter  # rank 0 only: others never load TensorBoard

            self._writer = SummaryWriter(log_dir=str(logdir), **kwargs)

    def __getattr__(self, name: str):
        # add_scalar, add_image, add_histogram, flush, close ...: forwarded on rank 0, swallowed elsewhere
        if name.startswith("add_") or name in ("flush", "close"):
            if self._writer is None:
                return lambda *a, **k: None
            return getattr(self._writer, name)
        raise AttributeError(name)

    def __enter__(self) -> RankZeroWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(iterable=None, **kwargs: Any) -> tqdm:
    """A tqdm bar, disabled off rank 0 (and where ``disable`` is true; ``disable=None``: where stderr is not a
    terminal, tqdm's rule, so that logs and captured test output get no bar)."""
    kwargs["disable"] = kwargs.get("disable", False) if is_rank_zero() else True
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
