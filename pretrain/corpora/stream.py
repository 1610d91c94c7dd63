"""An endless, per-rank sharded, exactly resumable stream of batches from a corpus.

The unit is the batch: which positions batch ``j`` of rank ``r`` holds and which batches a DataLoader worker
makes is ``common.data.stream_order`` (ranks never repeat each other; the batches do not depend on the worker
count), and an item's randomness comes from ``numpy.random.default_rng([seed, position])``. Resuming needs only
the number of batches a rank consumed (``StreamPosition``), so it is exact with 0, 1 or any number of workers.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate

from common.data.stream_order import batch_positions, worker_batches
from common.errors import DataError
from pretrain.corpora.weak_labels import WeakLabels

if TYPE_CHECKING:
    from pretrain.views import TwoViews

log = logging.getLogger(__name__)


class Source(Protocol):
    """A corpus: ``item(position, rng)`` returns a ``(1, D, H, W)`` float32 tensor or raises ``DataError``;
    corpora with covariates (``covariates`` in ``pretrain.corpora.CORPORA``) also have ``covariate(position, name)``
    and ``subject(position)``, whose item it is (weak labels are fixed per subject); corpora registered with
    ``rescans`` also have ``pair(position, rng)``: two volumes of the item's subject (two renderings, rescan views)."""

    name: str

    def item(self, position: int, rng: np.random.Generator) -> torch.Tensor: ...


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def file_at(position: int, n: int, seed: int) -> int:
    """Index of the file at ``position``: files are visited in a fresh random order every epoch of ``n``."""
    epoch, offset = divmod(position, n)
    return int(_epoch_permutation(n, seed, epoch)[offset])


EXACT_LABELS = WeakLabels()  # every subject's covariates as the corpus has them
FALLBACK_STRIDE = 2**40  # attempt a of a bad item reads position + a * stride: far beyond any real position


class CorpusStream(IterableDataset):
    """Endless batches ``{"image": (B, 1, D, H, W)}`` (or the ``views`` of each item: of its volume, or of its
    subject's two renderings when ``views.rescan``) from ``source``, from batch ``start`` on, with each of
    ``covariates`` as a (B,) float32 tensor (an objective's ``needs_covariates``), as the subject's ``labels``
    (exact by default; NaN where a weakly labelled subject has none).

    An unreadable or too-short item is replaced by the item at a fallback position (``position + a *
    FALLBACK_STRIDE`` for attempt ``a``), so batches stay deterministic; skipped items are counted (``_skipped``),
    and ``max_consecutive_bad`` failures in a row raise, as the corpus is then unusable. Each batch also
    carries ``_batch`` (its index) for ``StreamPosition``.
    """

    def __init__(
        self,
        source: Source,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        views: TwoViews | None = None,
        batch_size: int = 1,
        start: int = 0,
        max_consecutive_bad: int = 64,
        covariates: tuple[str, ...] = (),
        labels: WeakLabels = EXACT_LABELS,
    ):
        super().__init__()
        self.source = source
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.views = views
        self.rescan = views is not None and views.rescan  # items are two renderings of a subject (source.pair)
        self.batch_size = batch_size
        self.start = start
        self.max_consecutive_bad = max_consecutive_bad
        self.covariates = tuple(covariates)
        self.labels = labels
        self._consecutive = 0  # bad items in a row, in this worker

    def __iter__(self):
        self._consecutive = 0
        for j in worker_batches(self.start):
            samples = [self._sample(p) for p in batch_positions(self.rank, self.world_size, self.batch_size, j)]
            for sample in samples:
                sample["_batch"] = j
            yield default_collate(samples)

    def _sample(self, position: int) -> dict[str, Any]:
        """The item at ``position``, or at its first usable fallback position; ``_skipped`` counts the others."""
        for attempt in itertools.count():  # ends: max_consecutive_bad failures in a row raise
            at = position + attempt * FALLBACK_STRIDE
            rng = np.random.default_rng([self.seed, at])
            try:
                volume = self.source.pair(at, rng) if self.rescan else self.source.item(at, rng)
                values = {name: self.source.covariate(at, name) for name in self.covariates}
                if values and not self.labels.exact:
                    values = self.labels.apply(values, self.source.subject(at))
            except DataError as e:
                self._consecutive += 1
                log.warning("corpus %s: skipped item %d (rank %d): %s", self.source.name, at, self.rank, e)
                if self._consecutive >= self.max_consecutive_bad:
                    raise DataError(
                        None,
                        f"corpus {self.source.name}: {self._consecutive} items in a row could not be used "
                        f"(last: {e}); check the corpus paths and files",
                    ) from e
                continue
            self._consecutive = 0
            sample = self.views(volume, rng) if self.views is not None else {"image": volume}
            sample.update({name: torch.tensor(v, dtype=torch.float32) for name, v in values.items()})
            sample["_skipped"] = attempt
            return sample


@dataclass
class StreamPosition:
    """How far a rank's trainer has consumed its stream: enough to restart it exactly, with any worker count."""

    batches: int = 0  # batches received: the next batch is batch ``batches``
    items: int = 0  # samples received
    skipped: int = 0  # items skipped as unreadable / too short

    def update(self, batch: dict[str, Any]) -> None:
        """Record a batch received from the DataLoader (reads its bookkeeping fields)."""
        self.batches = int(batch["_batch"].max()) + 1
        self.items += int(batch["_batch"].numel())
        self.skipped += int(batch["_skipped"].sum())

    def bad_share(self) -> float:
        tried = self.items + self.skipped
        return self.skipped / tried if tried else 0.0

    def stream_kwargs(self) -> dict[str, Any]:
        """``start`` for a ``CorpusStream`` that continues where this one stopped."""
        return {"start": self.batches}

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "items": self.items, "skipped": self.skipped}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StreamPosition:
        """Restore ``state`` (also a checkpoint from before batch-wise streams: it continues, but not exactly)."""
        if "next_index" in state:
            log.warning(
                "the checkpoint's data stream position is from an older stream layout: the stream continues at "
                "batch %d but not with exactly the items an uninterrupted run would have seen",
                state["batches"],
            )
        return cls(batches=int(state["batches"]), items=int(state["items"]), skipped=int(state["skipped"]))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers are processes already; threads would only fight over the cores


def make_loader(stream: CorpusStream, num_workers: int, prefetch_factor: int) -> DataLoader:
    """DataLoader over ``stream``'s batches; decoding, augmentation and collation run in ``num_workers``
    processes (``prefetch_factor`` batches ahead each), the batches are the same for any ``num_workers``."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, worker_init_fn=_worker_init, persistent_workers=False)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(), **kwargs)
