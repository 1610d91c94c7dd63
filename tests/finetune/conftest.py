"""Tiny NIfTI cohorts for the fine-tune tests: a class-dependent blob (or an age-dependent one) in noise."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

SIZE = 16  # voxels per axis: the smallest volume that shows the behaviour


def write_cohort(
    folder: Path, task: str, n_subjects: int = 24, sites: int = 2, seed: int = 0, sessions: int = 1
) -> Path:
    """Write ``folder/images/*.nii.gz`` and ``folder/manifest.csv`` (the synth cohort columns)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"))  # (3, S, S, S)
    rows = []
    for i in range(n_subjects):
        age = float(rng.uniform(55, 85))
        if task == "brain_age":
            diagnosis, signal = "CN", (age - 55) / 30
        else:
            pos, neg = {"ad": ("AD", "CN"), "pd": ("PD", "HC")}[task]
            sick = i % 2 == 1
            diagnosis, signal = (pos if sick else neg), float(sick)
        for s in range(sessions):
            centre = np.array([SIZE / 2] * 3)
            radius = 3.0 + 2.5 * signal
            blob = (np.linalg.norm(grid - centre[:, None, None, None], axis=0) < radius).astype(np.float32)
            image = 1.0 + blob * 2.0 + rng.normal(0, 0.3, (SIZE,) * 3).astype(np.float32)
            name = f"sub-{i:03d}_ses-{s}.nii.gz"
            nib.save(
                nib.Nifti1Image(image.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
                folder / "images" / name,
            )
            rows.append(
                {
                    "path": f"images/{name}",
                    "subject_id": f"sub-{i:03d}",
                    "session_id": f"ses-{s}",
                    "site": f"site{(i // 2) % sites}",
                    "dataset": "tiny",
                    "age": round(age, 2),
                    "sex": "F",
                    "diagnosis": diagnosis,
                }
            )
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


@pytest.fixture(scope="session")
def ad_cohort(tmp_path_factory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("ad"), "ad")


@pytest.fixture(scope="session")
def age_cohort(tmp_path_factory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("age"), "brain_age", n_subjects=30)


@pytest.fixture(scope="session")
def make_cohort():
    """``write_cohort`` as a fixture, for tests that need a cohort of their own."""
    return write_cohort
