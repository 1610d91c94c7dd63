"""Datasets over synthetic MRI: generated on the fly (pre-training's ``synthmri`` corpus) or read from a folder."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from common.data.manifest import read_manifest
from common.distributed import get_rank
from common.errors import DataError
from synth.anatomy import anatomy_at
from synth.atrophy import atrophy_basis
from synth.config import SynthConfig
from synth.generator import Generator
from synth.subject import STREAM_KEY, corpus_plan


class SyntheticMRIStream(IterableDataset):
    """Endless (or ``length``-long) stream of synthetic volumes ``(1, D, H, W)`` float32 in [0, 1].

    Sample ``i`` of rank ``r`` in epoch ``e`` is seeded by ``(seed, r, e, i)``; DataLoader worker ``w`` of
    ``W`` makes samples ``i = w, w + W, ...``. So ranks never repeat each other, workers never repeat each
    other, and the samples do not depend on the number of workers. Covariates follow the corpus mix
    (``SynthConfig.cohort``); each sample has a scanner of its own. With ``return_covariates`` items are
    dicts ``{"image", "age", "sex", "diagnosis", "subject_id"}``.

    The template resamples are built in ``__init__`` (a few seconds), so forked DataLoader workers share them.
    """

    def __init__(
        self,
        config: SynthConfig | None = None,
        seed: int = 0,
        *,
        length: int | None = None,
        return_covariates: bool = False,
        rank: int | None = None,
        warm: bool = True,
    ):
        super().__init__()
        self.config = config or SynthConfig()
        self.seed = int(seed)
        self.length = length
        self.return_covariates = return_covariates
        self.rank = rank
        self.epoch = 0
        if length is not None and length < 0:
            raise ValueError(f"SyntheticMRIStream length must be >= 0 or None (endless), got {length}")
        if warm:
            anatomy_at(self.config.spacing)
            atrophy_basis(self.config.nonlinear.grid_lattice_mm)

    def set_epoch(self, epoch: int) -> None:
        """A new epoch draws new subjects (finite streams otherwise repeat the same ``length`` volumes)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless SyntheticMRIStream has no length; pass length=N for a finite one")
        return self.length

    def __iter__(self) -> Iterator[torch.Tensor | dict[str, object]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank = get_rank() if self.rank is None else self.rank
        generator = Generator(self.config)
        stop = math.inf if self.length is None else self.length
        i = worker
        while i < stop:
            plan = corpus_plan(self.config, self.seed, i, key=(STREAM_KEY, rank, self.epoch, i))
            image = generator(plan).image
            if self.return_covariates:
                yield {
                    "image": image,
                    "age": plan.age,
                    "sex": plan.sex,
                    "diagnosis": plan.diagnosis,
                    "subject_id": f"stream-r{rank}-e{self.epoch}-{i}",
                }
            else:
                yield image
            i += workers


class GeneratedDirectory(Dataset):
    """Map-style dataset over a folder written by ``python -m synth generate|cohort``.

    Items are ``(1, D, H, W)`` float32 images at the generator's spacing, or dicts with ``image``, ``label``
    (``(D, H, W)`` int64, when ``with_labels``) and the manifest's covariates (when ``return_covariates``).
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
        self.with_labels = with_labels
        self.return_covariates = return_covariates or with_labels

    def __len__(self) -> int:
        return len(self.table)

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
