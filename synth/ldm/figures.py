"""Slices of volumes for TensorBoard and the docs: one axial plane per volume, side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from synth.ldm.covariates import COVARIATES
from synth.ldm.model import LatentDiffusionModel
from synth.ldm.sampling import generate


def axial_strip(volumes: torch.Tensor) -> torch.Tensor:
    """``(B, 1, D, H, W)`` RAS volumes -> ``(H, B * D)`` image in [0, 1]: each volume's middle axial slice,
    anterior up, left-right across, volumes left to right."""
    mid = volumes.shape[-1] // 2
    slices = volumes[:, 0, :, :, mid].float().clamp(0, 1)  # (B, D=R, H=A)
    slices = slices.transpose(1, 2).flip(1)  # (B, A, R) with anterior at the top row
    return torch.cat(list(slices), dim=1)  # (A, B * R)


def age_sweep(
    model: LatentDiffusionModel,
    ages: Sequence[float],
    seed: int = 0,
    ddim_steps: int | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> torch.Tensor:
    """Volumes ``(len(ages), 1, D, H, W)`` from one noise, ``ages`` in natural units, the other covariates at
    the training median (mid-range for the bundle): what age alone changes."""
    if model.covariate_table is not None:
        base = model.covariate_table[list(COVARIATES)].median().to_numpy()
    else:
        base = (np.asarray(model.covariates.low) + np.asarray(model.covariates.high)) / 2
    natural = np.repeat(base[None], len(ages), axis=0)
    natural[:, 1] = ages
    cond = torch.from_numpy(model.covariates.normalise(natural))  # (n, 4)
    return generate(model, cond, [seed] * len(ages), ddim_steps, device, precision)


def save_age_sweep_png(volumes: torch.Tensor, ages: Sequence[float], path: str | Path, title: str) -> Path:
    """Axial, coronal and sagittal middle slices of each volume, one column per age, as a PNG."""
    import matplotlib  # heavy, and only figure commands need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vols = volumes[:, 0].float().clamp(0, 1).cpu().numpy()  # (n, D, H, W): R, A, S
    fig, axes = plt.subplots(3, len(ages), figsize=(1.9 * len(ages), 5.6), squeeze=False)
    for j, (vol, age) in enumerate(zip(vols, ages)):
        d, h, w = (s // 2 for s in vol.shape)
        views = (vol[:, :, w].T, vol[:, h, :].T, vol[d, :, :].T)  # axial A x R, coronal S x R, sagittal S x A
        for i, view in enumerate(views):
            axes[i, j].imshow(view, cmap="gray", vmin=0, vmax=1, origin="lower")
            axes[i, j].axis("off")
        axes[0, j].set_title(f"age {age:g}", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
