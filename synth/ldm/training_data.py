"""LDM training batches: preprocessed volumes with their conditioning; bad files skipped and counted."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.data import PreprocessConfig, build_preprocess
from common.errors import DataError

log = logging.getLogger(__name__)


class ConditionedVolumes(Dataset):
    """Item ``i``: ``{"image": (1, D, H, W) float32 in [0, 1], "cond": (4,) float32}``, or
    ``{"bad": message}`` when the file cannot be used (the loop skips it and counts it)."""

    def __init__(self, paths: Sequence[str], cond: np.ndarray, preprocess: PreprocessConfig):
        if len(paths) != len(cond):
            raise ValueError(f"{len(paths)} paths but {len(cond)} conditioning rows")
        self.paths = list(paths)
        self.cond = torch.as_tensor(np.asarray(cond, dtype=np.float32))  # (N, 4)
        self.preprocess_cfg = preprocess
        self._preprocess = None  # built in the worker that uses it

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        if self._preprocess is None:
            self._preprocess = build_preprocess(self.preprocess_cfg)
        try:
            image = self._preprocess({"image": self.paths[i]})["image"]
        except DataError as e:
            return {"bad": str(e)}
        return {"image": image, "cond": self.cond[i]}


def collate_skipping_bad(items: list[dict]) -> dict:
    """``{"image": (B, 1, D, H, W) | None, "cond": (B, 4) | None, "bad": [messages]}``."""
    good = [it for it in items if "bad" not in it]
    return {
        "image": torch.stack([it["image"] for it in good]) if good else None,
        "cond": torch.stack([it["cond"] for it in good]) if good else None,
        "bad": [it["bad"] for it in items if "bad" in it],
    }


class BadSampleGuard:
    """Counts unreadable samples; raises ``DataError`` once their share passes ``limit``.

    The share is judged after ``min(dataset size, 20)`` samples, so one early bad file in a large corpus does
    not stop a run, while a corpus that is mostly unreadable stops within its first batches.
    """

    def __init__(self, limit: float, dataset_size: int, manifest: str):
        self.limit, self.manifest = limit, manifest
        self.min_seen = min(dataset_size, 20)
        self.seen = self.bad = 0

    def update(self, batch: dict) -> None:
        n_good = 0 if batch["image"] is None else len(batch["image"])
        self.seen += n_good + len(batch["bad"])
        self.bad += len(batch["bad"])
        for message in batch["bad"]:
            log.warning("skipped a bad sample: %s", message)
        if self.bad and self.seen >= self.min_seen and self.bad / self.seen > self.limit:
            raise DataError(
                self.manifest,
                f"{self.bad} of {self.seen} samples read so far were unusable, more "
                f"than data.max_bad_fraction={self.limit}; last: {batch['bad'][-1:]}",
            )


def endless_batches(dataset: Dataset, batch_size: int, num_workers: int, seed: int) -> Iterator[dict]:
    """Shuffled batches forever (a new order each pass); workers decode NIfTI while the model trains."""
    epoch = 0
    while True:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=num_workers,
            collate_fn=collate_skipping_bad,
            drop_last=len(dataset) >= batch_size,
            generator=torch.Generator().manual_seed(seed + epoch),
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )
        yield from loader
        epoch += 1
