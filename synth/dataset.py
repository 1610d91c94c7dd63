"""Synthetic MRI as datasets: pre-training's corpus generated on the fly (``SyntheticMRIStream``, the one
synthetic stream: ``pretrain``'s ``synthmri`` corpus reads it) or a folder ``python -m synth`` wrote."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from common.data.manifest import read_manifest
from common.data.stream_order import batch_positions, worker_batches
from common.distributed import get_rank, get_world_size
from common.errors import DataError
from synth.config import SynthConfig
from synth.generator import Generator
from synth.subject import SubjectPlan, corpus_plan, rendering


class SyntheticMRIStream(IterableDataset):
    """Batches of pre-training's synthetic subjects, made one volume at a time or a batch at a time on a device.

    Seeding: the subject at corpus position ``p`` is ``corpus_plan(config, seed, p)``: its covariates, atrophy,
    scanner and volume all come from ``(seed, p)``, and it is subject ``p`` of ``python -m synth generate --seed
    seed``. Order (``common.data.stream_order``): batch ``j`` of ``rank`` out of ``world_size`` holds the positions
    ``(j * world_size + rank) * batch_size + slot``; DataLoader worker ``w`` of ``W`` makes batches ``start + w,
    start + w + W, ...``. So ranks never repeat each other, the batches do not depend on the worker count, and a
    stream from ``start=j`` continues exactly where one that delivered ``j`` batches stopped. ``rank`` and
    ``world_size`` default to ``torch.distributed``'s (else ``RANK`` / ``WORLD_SIZE``) when iteration starts.

    Items: ``{"image": (B, 1, D, H, W) float32 in [0, 1], "position": (B,) int64, "age": (B,) float32}`` at the
    generator's shape. ``device`` None makes each volume on its own on the CPU (``Generator(plan)``, what
    DataLoader workers run); a device makes each batch in one ``Generator.batch`` call there (equal to the CPU's
    volumes to float rounding, except CUDA's noise: the device's own draw). ``length`` batches from ``start``,
    or endless (None). The generator, and with it synth's template caches, is built in ``__init__``: forked
    DataLoader workers share it.
    """

    def __init__(
        self,
        config: SynthConfig | None = None,
        seed: int = 0,
        *,
        batch_size: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        start: int = 0,
        length: int | None = None,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"SyntheticMRIStream batch_size must be >= 1, got {batch_size}")
        if length is not None and length < 0:
            raise ValueError(f"SyntheticMRIStream length must be >= 0 or None (endless), got {length}")
        self.config = config or SynthConfig()
        self.seed = int(seed)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start, self.length = start, length
        self.device = None if device is None else torch.device(device)
        self.generator = Generator(self.config)

    def plan(self, position: int) -> SubjectPlan:
        """The subject at corpus ``position`` (its covariates without making the volume)."""
        return corpus_plan(self.config, self.seed, position)

    def volume(self, position: int, r: int = 0) -> torch.Tensor:
        """The image ``(1, D, H, W)`` of the subject at ``position``, made on the CPU; ``r`` >= 1: a rescan of it,
        the same anatomy by another scanner (``synth.subject.rendering``)."""
        return self.generator(rendering(self.config, self.plan(position), r)).image

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless SyntheticMRIStream has no length; pass length=N for a finite one")
        return self.length

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rank = get_rank() if self.rank is None else self.rank
        world_size = get_world_size() if self.world_size is None else self.world_size
        batches = worker_batches(self.start)
        if self.length is not None:
            batches = itertools.takewhile(lambda j: j < self.start + self.length, batches)
        for j in batches:
            positions = batch_positions(rank, world_size, self.batch_size, j)
            plans = [self.plan(p) for p in positions]
            if self.device is None:
                images = torch.stack([self.generator(plan).image for plan in plans])
            else:
                images = self.generator.batch(plans, self.device)
            yield {
                "image": images,  # (B, 1, D, H, W)
                "position": torch.tensor(positions, dtype=torch.long),
                "age": torch.tensor([plan.age for plan in plans], dtype=torch.float32),
            }


class GeneratedDirectory(Dataset):
    """Map-style dataset over a folder written by ``python -m synth generate|cohort``.

    Items are ``(1, D, H, W)`` float32 images at the generator's spacing, or dicts with ``image``, ``label``
    (``(D, H, W)`` int64, when ``with_labels``) and the manifest's covariates (when ``return_covariates``): one
    item per manifest row, so each of a subject's renderings (``generate --renderings K``) is an item.
    ``subject_rows`` lists each subject's rows (its renderings), subjects in manifest order.
    """

    def __init__(self, directory: str | Path, with_labels: bool = False, return_covariates: bool = False):
        self.directory = Path(directory).expanduser()
        manifest = self.directory / "manifest.csv"
        if not manifest.is_file():
            raise DataError(
                manifest,
                "no manifest.csv: is this a folder written by `python -m synth`? "
                "(it is written when generation finishes)",
            )
        required = ("path", "subject_id", "label_path") if with_labels else ("path", "subject_id")
        self.table = read_manifest(manifest, required=required)
        rows = self.table.groupby("subject_id", sort=False).indices
        self.subject_rows = [[int(i) for i in rows[s]] for s in self.table["subject_id"].unique()]
        self.with_labels = with_labels
        self.return_covariates = return_covariates or with_labels

    def __len__(self) -> int:
        return len(self.table)

    @property
    def renderings(self) -> int:
        """Renderings every subject has (1 for a folder made without ``--renderings``, and for a cohort)."""
        return min(len(rows) for rows in self.subject_rows)

    def _read(self, path: Path, dtype: type) -> np.ndarray:
        try:
            return np.asarray(nib.load(path).dataobj, dtype=dtype)
        except FileNotFoundError:
            raise DataError(path, "file listed in manifest.csv does not exist") from None
        except Exception as e:
            raise DataError(path, f"cannot be read as NIfTI ({e})") from None

    def __getitem__(self, index: int) -> torch.Tensor | dict[str, object]:
        row = self.table.iloc[index]
        image = torch.from_numpy(self._read(Path(row["path"]), np.float32))[None]  # (1, D, H, W)
        if not self.return_covariates:
            return image
        item: dict[str, object] = {"image": image}
        for key in ("subject_id", "site", "age", "sex", "diagnosis"):
            if key in row.index:
                item[key] = row[key]
        if self.with_labels:
            label_path = Path(str(row["label_path"]))
            label_path = label_path if label_path.is_absolute() else self.directory / label_path
            item["label"] = torch.from_numpy(self._read(label_path, np.uint8).astype(np.int64))
        return item
