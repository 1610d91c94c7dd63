"""An endless, per-rank and per-worker sharded, exactly resumable stream of samples from a corpus.

Every item is a pure function of its *position* in one global sequence: position ``k * S + s`` is item ``k``
of stream ``s = rank * W + worker`` out of ``S = world * W`` streams, and its randomness comes from
``numpy.random.default_rng([seed, position])``. Ranks and workers therefore never repeat each other, and a
stream restarts exactly at the item after the last one the trainer consumed: the trainer records, per worker,
the index after the last item it received (``StreamPosition``), and the DataLoader's round-robin over workers
is rotated so that the worker due next comes first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common.errors import DataError

log = logging.getLogger(__name__)


class Source(Protocol):
    """A corpus: ``item(position, rng)`` returns a ``(1, D, H, W)`` float32 tensor or raises ``DataError``."""

    name: str

    def item(self, position: int, rng: np.random.Generator) -> torch.Tensor: ...


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def file_at(position: int, n: int, seed: int) -> int:
    """Index of the file at ``position``: files are visited in a fresh random order every epoch of ``n``."""
    epoch, offset = divmod(position, n)
    return int(_epoch_permutation(n, seed, epoch)[offset])


class CorpusStream(IterableDataset):
    """Endless samples ``{"image": (1, D, H, W)}`` (or the ``views`` of each volume) from ``source``.

    Unreadable or too-short items are skipped and counted (``_skipped`` in the next sample); a worker that
    meets ``max_consecutive_bad`` of them in a row raises, as the corpus is then unusable. Each sample also
    carries ``_worker`` (logical worker id) and ``_next`` (that worker's index after this item) for
    ``StreamPosition``.
    """

    def __init__(
        self,
        source: Source,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        views: Callable[[torch.Tensor, np.random.Generator], dict[str, torch.Tensor]] | None = None,
        start: dict[int, int] | None = None,
        worker_offset: int = 0,
        max_consecutive_bad: int = 64,
    ):
        super().__init__()
        self.source = source
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.views = views
        self.start = dict(start or {})
        self.worker_offset = worker_offset
        self.max_consecutive_bad = max_consecutive_bad

    def __iter__(self):
        info = get_worker_info()
        n_workers, physical = (info.num_workers, info.id) if info is not None else (1, 0)
        worker = (physical + self.worker_offset) % n_workers  # the rotation that makes resume exact
        stream, n_streams = self.rank * n_workers + worker, self.world_size * n_workers
        k = self.start.get(worker, 0)
        skipped = consecutive = 0
        while True:
            position = k * n_streams + stream
            rng = np.random.default_rng([self.seed, position])
            k += 1
            try:
                volume = self.source.item(position, rng)
            except DataError as e:
                skipped += 1
                consecutive += 1
                log.warning(
                    "corpus %s: skipped item %d (rank %d, worker %d): %s",
                    self.source.name,
                    position,
                    self.rank,
                    worker,
                    e,
                )
                if consecutive >= self.max_consecutive_bad:
                    raise DataError(
                        None,
                        f"corpus {self.source.name}: {consecutive} items in a row could not be used "
                        f"(last: {e}); "
                        "check the corpus paths and files",
                    ) from e
                continue
            consecutive = 0
            sample = self.views(volume, rng) if self.views is not None else {"image": volume}
            sample.update(_worker=worker, _next=k, _skipped=skipped)
            skipped = 0
            yield sample


@dataclass
class StreamPosition:
    """How far a rank's trainer has consumed its stream: enough to restart it exactly."""

    num_workers: int  # DataLoader workers (0 counts as one logical worker)
    batches: int = 0  # batches received
    next_index: dict[int, int] = field(default_factory=dict)  # per logical worker: index of its next item
    items: int = 0  # samples received
    skipped: int = 0  # items skipped as unreadable / too short

    @property
    def logical_workers(self) -> int:
        return max(1, self.num_workers)

    def update(self, batch: dict[str, Any]) -> None:
        """Record a batch received from the DataLoader (reads its bookkeeping fields)."""
        self.batches += 1
        self.items += int(batch["_worker"].numel())
        self.skipped += int(batch["_skipped"].sum())
        self.next_index[int(batch["_worker"][0])] = int(batch["_next"].max())

    def bad_share(self) -> float:
        tried = self.items + self.skipped
        return self.skipped / tried if tried else 0.0

    def stream_kwargs(self) -> dict[str, Any]:
        """``start`` and ``worker_offset`` for a ``CorpusStream`` that continues where this one stopped."""
        return {"start": dict(self.next_index), "worker_offset": self.batches % self.logical_workers}

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "batches": self.batches,
            "items": self.items,
            "skipped": self.skipped,
            "next_index": {str(k): v for k, v in self.next_index.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], num_workers: int) -> StreamPosition:
        """Restore ``state``; with a different worker count the stream restarts fresh (counts are kept)."""
        pos = cls(num_workers=num_workers, items=state["items"], skipped=state["skipped"])
        if int(state["num_workers"]) == num_workers:
            pos.batches = state["batches"]
            pos.next_index = {int(k): v for k, v in state["next_index"].items()}
        else:
            log.warning(
                "data.num_workers changed from %s to %s: the data stream restarts rather than resuming exactly",
                state["num_workers"],
                num_workers,
            )
        return pos


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers are processes already; threads would only fight over the cores


def make_loader(stream: CorpusStream, batch_size: int, num_workers: int, prefetch_factor: int) -> DataLoader:
    """DataLoader over ``stream``; decoding and augmentation run in ``num_workers`` processes."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, worker_init_fn=_worker_init, persistent_workers=False)
    return DataLoader(
        stream, batch_size=batch_size, num_workers=num_workers, pin_memory=torch.cuda.is_available(), **kwargs
    )
