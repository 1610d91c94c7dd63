"""A BIDS tree laid out the way studies share one, made from a synthetic cohort (``python -m synth cohort``):
``participants.tsv`` with study labels (Control / Dementia) and an ``n/a`` age, sessions with a ``sessions.tsv``,
two runs of one session, an LPS-oriented and an anisotropic file, scanner sidecars, a ``derivatives/`` folder."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.ndimage import zoom

STUDY_LABELS = {"CN": "Control", "AD": "Dementia"}


def _write(image: nib.Nifti1Image, path: Path, how: str) -> None:
    data, affine = np.asarray(image.dataobj, dtype=np.float32), image.affine.copy()
    if how == "lps":  # the same brain stored with the first two axes flipped (LPS+), as DICOM converters write
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = np.array(data.shape[:2]) - 1  # stored voxel (i, j, k) is voxel (n0-1-i, n1-1-j, k)
        data, affine = np.ascontiguousarray(data[::-1, ::-1]), affine @ flip
    elif how == "anisotropic":  # thick slices along the last axis (1.5x the voxel size), resampled
        data = zoom(data, (1, 1, 2 / 3), order=1)
        affine = affine @ np.diag([1, 1, 1.5, 1])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


def bids_from_cohort(cohort: Path, root: Path) -> pd.DataFrame:
    """Write ``cohort``'s subjects as the BIDS dataset ``root``; returns the cohort's manifest (its truth)."""
    table = pd.read_csv(cohort / "manifest.csv")
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "synthetic AD", "BIDSVersion": "1.8.0"}))
    participants = []
    for i, row in table.iterrows():
        sub = f"sub-{i + 1:02d}"
        age = "n/a" if i == 0 else f"{row['age']:.1f}"  # a study that did not record one subject's age
        participants.append([sub, age, row["sex"], STUDY_LABELS[row["diagnosis"]], row["site"]])
        image = nib.load(cohort / row["path"])
        how = "lps" if i == 1 else "anisotropic" if i == 2 else "as-is"
        if i == 3:  # two sessions, the second a year later; ages in the subject's sessions.tsv
            for ses in ("01", "02"):
                _write(image, root / sub / f"ses-{ses}" / "anat" / f"{sub}_ses-{ses}_T1w.nii.gz", how)
            sessions = f"session_id\tage\nses-01\t{row['age']:.1f}\nses-02\t{row['age'] + 1:.1f}\n"
            (root / sub / f"{sub}_sessions.tsv").write_text(sessions)
        elif i == 4:  # two runs of one session (a repeat after motion)
            for run in ("1", "2"):
                _write(image, root / sub / "ses-01" / "anat" / f"{sub}_ses-01_run-{run}_T1w.nii.gz", how)
        else:
            _write(image, root / sub / "anat" / f"{sub}_T1w.nii.gz", how)
    lines = ["participant_id\tage\tsex\tgroup\tsite"] + ["\t".join(map(str, p)) for p in participants]
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    (root / "T1w.json").write_text(json.dumps({"Manufacturer": "Siemens", "MagneticFieldStrength": 3}))
    derived = root / "derivatives" / "fmriprep" / "sub-01" / "anat" / "sub-01_desc-preproc_T1w.nii.gz"
    _write(nib.load(cohort / table["path"].iloc[0]), derived, "as-is")  # left out unless asked
    return table
