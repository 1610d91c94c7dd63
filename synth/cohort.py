"""Write a synthetic corpus or labelled cohort to a folder: parallel, resumable, deterministic.

Layout: ``DIR/images/<subject>.nii.gz`` (float32, [0, 1]), ``DIR/labels/<subject>.nii.gz`` (uint8,
``synth.regions.LABELS``), ``DIR/manifest.csv`` (the project's manifest columns + rendering, seed, effects,
scanner, measured volumes) and ``DIR/synth.yaml`` (the settings; a resumed run must use the same ones). With K
renderings per subject (``Job.renderings``, ``generate --renderings K``: the same anatomy by K scanners,
``synth.subject.rendering``) rendering r is session ``ses-<r+1>``: ``<subject>_ses-<r+1>.nii.gz``, one manifest
row each. A volume is finished when both its files exist; each file is written atomically, so a killed run leaves
no half file, and a rerun skips finished volumes. The manifest is rewritten (atomically) at the end from all rows.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import yaml
from omegaconf import OmegaConf

from common.data.manifest import MANIFEST_COLUMNS
from common.data.nifti import write_nifti
from common.errors import ConfigError, DataError
from common.io import atomic_write
from common.tb import progress
from synth.config import TASKS, SynthConfig
from synth.generator import Generator, head_scale, warm_up
from synth.regions import label_volumes
from synth.shard import Shard, differences, write_settings
from synth.subject import SubjectPlan, cohort_plan, corpus_plan, rendering


@dataclass(frozen=True)
class Job:
    """What is generated: a pre-training corpus (``task=None``) or a labelled cohort of ``task`` over ``sites``,
    ``renderings`` volumes per subject (the same anatomy by that many scanners)."""

    seed: int
    task: str | None = None
    sites: int = 1
    renderings: int = 1

    @property
    def dataset(self) -> str:
        return f"synth_{self.task}" if self.task else "synth_mri"

    def plan(self, cfg: SynthConfig, index: int, r: int = 0) -> SubjectPlan:
        """Rendering ``r`` of subject ``index``."""
        if self.task is None:
            return rendering(cfg, corpus_plan(cfg, self.seed, index), r)
        return rendering(cfg, cohort_plan(cfg, self.task, self.seed, index, self.sites), r)

    def volumes(self, indices: range) -> list[tuple[int, int]]:
        """The (index, rendering) pairs of ``indices``' subjects, in manifest order."""
        return [(i, r) for i in indices for r in range(self.renderings)]

    def stem(self, plan: SubjectPlan) -> str:
        """A volume's file name without extension: the subject, and its session when there are several."""
        return plan.subject_id if self.renderings == 1 else f"{plan.subject_id}_ses-{plan.rendering + 1}"


def check_job(job: Job, n: int) -> None:
    """Raise ConfigError for settings no volume can be made with (before anything is written)."""
    if n <= 0:
        raise ConfigError(f"--n must be a positive number of subjects, got {n}")
    if job.task is not None and job.task not in TASKS:
        raise ConfigError(f"unknown task {job.task!r}: choose one of {', '.join(TASKS)}")
    if job.sites < 1:
        raise ConfigError(f"--sites must be >= 1, got {job.sites}")
    if job.renderings < 1:
        raise ConfigError(f"--renderings must be >= 1, got {job.renderings}")


def _settings(cfg: SynthConfig, job: Job):
    """What decides the folder's volumes: the job and the full config (``synth.yaml``, each shard's record).
    ``renderings`` is recorded where it is not 1, so a folder made before renderings existed still resumes."""
    record = {k: v for k, v in asdict(job).items() if not (k == "renderings" and v == 1)}
    return OmegaConf.create({"job": record, "config": OmegaConf.structured(cfg)})


def _prepare(out: Path, cfg: SynthConfig, job: Job, stems: set[str]) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(out, "the output path is a file, not a folder; give a folder with --out")
    settings = OmegaConf.to_yaml(_settings(cfg, job))
    record = out / "synth.yaml"
    if record.is_file():
        changed = differences(yaml.safe_load(record.read_text()), yaml.safe_load(settings))
        if changed:
            raise ConfigError(
                f"{out} was generated with other settings ({'; '.join(changed[:3])}); resume with the "
                f"same settings or choose another --out"
            )
    try:
        for sub in ("images", "labels"):
            (out / sub).mkdir(parents=True, exist_ok=True)
            # temporary files of a killed run, never outputs; only our own volumes' (other shards may be writing)
            for stale in (out / sub).glob(".tmp-*.nii.gz"):
                if stale.name.split("-", 2)[-1].removesuffix(".nii.gz") in stems:
                    stale.unlink(missing_ok=True)
        if not record.is_file():
            with atomic_write(record) as tmp:
                tmp.write_text(settings)
    except OSError as e:
        raise DataError(out, f"cannot create the output folder: {e.strerror or e}") from None


def _paths(out: Path, stem: str) -> tuple[Path, Path]:
    return out / "images" / f"{stem}.nii.gz", out / "labels" / f"{stem}.nii.gz"


def _bytes_per_subject(cfg: SynthConfig) -> int:
    # float32 image with noise barely compresses; labels compress ~20x
    return int(np.prod(cfg.shape) * (4 * 0.9 + 0.1))


def _check_space(out: Path, cfg: SynthConfig, todo: int) -> None:
    need = todo * _bytes_per_subject(cfg)
    free = shutil.disk_usage(out).free
    if need > free:
        raise DataError(
            out,
            f"not enough disk space: {todo} more volumes need about {need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free; free space or lower --n",
        )


def _row(cfg: SynthConfig, job: Job, plan: SubjectPlan, volumes: dict[str, float]) -> dict[str, object]:
    image, label = (f"{sub}/{job.stem(plan)}.nii.gz" for sub in ("images", "labels"))
    row = {
        "path": image,
        **plan.row(),
        "dataset": job.dataset,
        "label_path": label,
        "spacing": cfg.spacing,
        "head_scale": round(head_scale(cfg, plan), 4),
        **volumes,
    }
    return {c: row[c] for c in MANIFEST_COLUMNS} | {k: v for k, v in row.items() if k not in MANIFEST_COLUMNS}


# ---- one subject, in whichever process runs it
_WORKER: dict[str, object] = {}


def _init_worker(cfg: SynthConfig, job: Job, out: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(cfg=cfg, job=job, out=out, generator=Generator(cfg))


def _make(volume: tuple[int, int]) -> dict[str, object]:
    cfg, job, out, gen = _WORKER["cfg"], _WORKER["job"], _WORKER["out"], _WORKER["generator"]
    plan = job.plan(cfg, *volume)
    vol = gen(plan, with_labels=True)
    image_path, label_path = _paths(out, job.stem(plan))
    spacing = (cfg.spacing,) * 3
    try:
        write_nifti(vol.image, image_path, spacing=spacing, affine=vol.affine)
        write_nifti(vol.labels, label_path, spacing=spacing, affine=vol.affine, dtype=np.uint8)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DataError(
                out, "the disk filled up while writing; free space and rerun (finished subjects are kept)"
            ) from None
        raise DataError(image_path, f"cannot be written: {e.strerror or e}") from None
    return _row(cfg, job, plan, label_volumes(vol.labels.numpy(), cfg.spacing))


def _finished_row(cfg: SynthConfig, job: Job, out: Path, volume: tuple[int, int]) -> dict[str, object] | None:
    plan = job.plan(cfg, *volume)
    image_path, label_path = _paths(out, job.stem(plan))
    if not (image_path.is_file() and label_path.is_file()):
        return None
    try:
        labels = np.asarray(nib.load(label_path).dataobj, dtype=np.uint8)
    except Exception:  # an unreadable kept file is remade rather than trusted
        return None
    return _row(cfg, job, plan, label_volumes(labels, cfg.spacing))


def _run(
    todo: list[tuple[int, int]], cfg: SynthConfig, job: Job, out: Path, workers: int
) -> Iterator[dict[str, object]]:
    if workers <= 1 or len(todo) <= 1:
        _init_worker(cfg, job, out, torch.get_num_threads())
        for volume in todo:
            yield _make(volume)
        return
    # Build the template caches here, then fork: workers inherit them and start at once (as DataLoader workers
    # do). Where fork does not exist, spawned workers build their own.
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    if method == "fork":
        warm_up(cfg)
    with ProcessPoolExecutor(
        workers, mp_context=get_context(method), initializer=_init_worker, initargs=(cfg, job, out, 1)
    ) as pool:
        futures = [pool.submit(_make, volume) for volume in todo]
        try:
            for f in as_completed(futures):
                yield f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def generate(
    out: str | Path,
    cfg: SynthConfig,
    job: Job,
    n: int,
    workers: int = 1,
    show_progress: bool = True,
    shard: Shard | None = None,
) -> Path:
    """Make subjects ``0 .. n-1`` (``job.renderings`` volumes each) under ``out``, skipping finished volumes, and
    write ``out/manifest.csv``.

    With ``shard`` only that shard's index range is made and its rows go to ``out/manifest.shard-K-of-N.csv``
    (``synth.shard.merge`` joins them)."""
    check_job(job, n)
    if shard is not None and shard.count > n:
        raise ConfigError(f"--shard {shard.k}/{shard.count}: more shards than subjects (--n {n})")
    indices = range(n) if shard is None else shard.indices(n)
    out = Path(out).expanduser()
    volumes = job.volumes(indices)
    _prepare(out, cfg, job, {job.stem(job.plan(cfg, *v)) for v in volumes})
    rows = {v: row for v in volumes if (row := _finished_row(cfg, job, out, v)) is not None}
    todo = [v for v in volumes if v not in rows]
    _check_space(out, cfg, len(todo))
    desc = f"synth {job.dataset}" + ("" if shard is None else f" {shard.k}/{shard.count}")
    bar = progress(total=len(volumes), initial=len(rows), desc=desc, unit="vol", disable=not show_progress)
    with bar:
        for row in _run(todo, cfg, job, out, workers):
            rows[int(row["index"]), int(row["rendering"])] = row
            bar.update(1)
    if shard is not None:  # merge refuses shards made with other settings than the rest
        write_settings(out, shard, n, OmegaConf.to_container(_settings(cfg, job)))
    manifest = out / ("manifest.csv" if shard is None else shard.manifest_name)
    with atomic_write(manifest) as tmp:
        pd.DataFrame([rows[v] for v in volumes]).to_csv(tmp, index=False)
    return manifest


def default_workers() -> int:
    """All cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
