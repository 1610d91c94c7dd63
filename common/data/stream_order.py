"""The order of every stream of corpus positions: pretrain's corpora and synth's ``SyntheticMRIStream``.

Batch ``j`` of rank ``r`` out of ``world_size`` holds the positions ``(j * world_size + r) * batch_size + slot``
(``batch_positions``), so ranks never repeat each other. In a DataLoader, worker ``w`` of ``W`` makes batches
``start + w, start + w + W, ...`` (``worker_batches``) and the DataLoader's in-order round-robin hands them over as
``start, start + 1, ...``: the batches do not depend on the worker count, and a stream started at batch ``j``
continues exactly where one that delivered ``j`` batches stopped.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from torch.utils.data import get_worker_info


def batch_positions(rank: int, world_size: int, batch_size: int, batch: int) -> list[int]:
    """Corpus positions of batch ``batch`` of ``rank``."""
    first = (batch * world_size + rank) * batch_size
    return list(range(first, first + batch_size))


def worker_batches(start: int) -> Iterator[int]:
    """The batch indices this DataLoader worker (or the process, outside a DataLoader) makes, from ``start`` on."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return itertools.count(start + worker, workers)
