"""Scanner artefacts on the subject-space image: bias field, acquisition resolution, noise, contrast curve."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from synth.deformation import Lattice
from synth.resize import resize


def log_bias_field(lattice: Lattice, sd: float, control_mm: float, rng: np.random.Generator) -> torch.Tensor:
    """Smooth log bias (d, h, w) on ``lattice``: Gaussian at control points ``control_mm`` apart, upsampled."""
    extent = lattice.step * (np.asarray(lattice.size) - 1)
    coarse = tuple(int(math.ceil(e / control_mm)) + 1 for e in extent)
    b = torch.from_numpy(rng.normal(0.0, sd, (1, 1, *coarse)).astype(np.float32))
    return F.interpolate(b, size=lattice.size, mode="trilinear", align_corners=True)[0, 0]


def acquire(
    image: torch.Tensor,
    spacing: float,
    resolution_mm: tuple[float, float, float],
    noise_sd: float,
    rician: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Simulate acquisition at ``resolution_mm`` (block averaging by the nearest integer factor of the output
    spacing, e.g. thick slices), add noise on that grid, and interpolate back to the output grid.

    ``image`` (1, 1, D, H, W). Noise is added on the acquired grid, so thick-slice images get noise correlated
    along the slice axis, as a resampled scan has. Rician noise is the magnitude of complex Gaussian noise
    (a noise floor in the background, as in magnitude MR images); Gaussian noise is plain additive.
    """
    shape = tuple(image.shape[2:])
    # integer averaging factors: avg_pool is ~10x faster than adaptive pooling and the ratio need not be exact
    factor = tuple(max(1, round(r / spacing)) for r in resolution_mm)
    low = F.avg_pool3d(image, factor, ceil_mode=True) if max(factor) > 1 else image
    n1 = torch.randn(low.shape, generator=generator, device=generator.device)
    if rician:
        n2 = torch.randn(low.shape, generator=generator, device=generator.device)
        low = torch.sqrt((low + noise_sd * n1).square_() + (noise_sd * n2).square_())
    else:
        low = low + noise_sd * n1
    if max(factor) > 1:
        low = resize(low[0], shape, align_corners=False)[None]
    return low
