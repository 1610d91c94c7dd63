"""Writing NIfTI volumes (synthetic cohorts, test fixtures): atomic, float32, RAS affine by default."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from common.io import atomic_write


def spacing_affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """A RAS+ affine with voxel size ``spacing`` whose world origin (0, 0, 0) is the volume's centre."""
    spacing = np.asarray(spacing, dtype=np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -spacing * (np.asarray(shape[:3], dtype=np.float64) - 1) / 2
    return affine


def write_nifti(
    array: np.ndarray | torch.Tensor,
    path: str | Path,
    spacing: Sequence[float] | None = (1.0, 1.0, 1.0),
    affine: np.ndarray | None = None,
    dtype: np.dtype | type = np.float32,
) -> Path:
    """Write a ``(D, H, W)`` or ``(1, D, H, W)`` volume to ``path`` (``.nii`` or ``.nii.gz``), atomically.

    Without ``affine`` the voxel axes are R, A, S with voxel size ``spacing`` (origin at the centre); with
    one, the affine is written as given and ``spacing``, if not None, must match its voxel sizes.
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{path}: a NIfTI file name must end with .nii or .nii.gz")
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]  # (1, D, H, W) -> (D, H, W)
    if data.ndim != 3:
        raise ValueError(f"{path}: write_nifti takes a (D, H, W) or (1, D, H, W) array, got {data.shape}")
    if affine is None:
        if spacing is None:
            raise ValueError(f"{path}: give spacing or affine")
        affine = spacing_affine(spacing, data.shape)
    else:
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"{path}: affine must be 4x4, got {affine.shape}")
        voxel = np.linalg.norm(affine[:3, :3], axis=0)
        if spacing is not None and not np.allclose(voxel, spacing, rtol=1e-4):
            raise ValueError(f"{path}: spacing {tuple(spacing)} disagrees with the affine's voxel size {tuple(voxel)}")
    image = nib.Nifti1Image(data.astype(dtype, copy=False), affine)
    image.set_qform(affine, code=1)  # scanner-aligned: readers that prefer qform see the same orientation
    image.set_sform(affine, code=1)
    with atomic_write(path) as tmp:
        nib.save(image, tmp)
    return path
