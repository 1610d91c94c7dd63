"""Scanner and pipeline artefacts on the subject-space image: bias field, k-space artefacts (Gibbs ringing,
motion ghosts), acquisition resolution, noise, contrast curve; the brain mask a skull-stripping step leaves."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from synth.config import PipelineConfig
from synth.deformation import Lattice
from synth.resize import resize
from synth.scanner import ScannerProfile

STRIP_SMOOTH_MM = 2.0  # a skull-stripping mask's surface is smooth on this scale (sigma of the mask's blur)
STRIP_SEED = 3  # the mask error's child seed of the noise seed (1: registered pose, 2: a rendering's bias)


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


def k_space_artefacts(image: torch.Tensor, scanner: ScannerProfile, spacing: float) -> torch.Tensor:
    """Gibbs ringing and motion ghosts along ``scanner.phase_axis`` of ``image`` (1, 1, D, H, W); unchanged
    when the scanner has neither.

    Ringing: k-space kept only up to the frequency of ``ringing_mm`` (a hard cut, no apodising filter), as a
    matrix too small for the object leaves it (Gibbs ringing; Kellner et al., MRM 2016), so edges overshoot in
    ripples; the magnitude is kept, as a magnitude image does. Ghosts: periodic motion modulates
    the k-space lines, which puts attenuated copies of the object at +- ``ghost_shift`` of the field of view
    along phase encoding, wrapped around (Wood and Henkelman, Med Phys 1985)."""
    dim = 2 + scanner.phase_axis
    if scanner.ringing_mm > spacing:
        n = image.shape[dim]
        kept = (torch.fft.fftfreq(n, device=image.device).abs() <= 0.5 * spacing / scanner.ringing_mm).to(image.dtype)
        shape = [1] * image.ndim
        shape[dim] = n
        image = torch.fft.ifft(torch.fft.fft(image, dim=dim) * kept.reshape(shape), dim=dim).abs()
    if scanner.ghost_amplitude > 0:
        shift = max(1, round(scanner.ghost_shift * image.shape[dim]))
        copies = image.roll(shift, dims=dim) + image.roll(-shift, dims=dim)
        image = image + scanner.ghost_amplitude * copies
    return image


def brain_mask(image: torch.Tensor, pipeline: PipelineConfig, spacing: float, noise_seed: int) -> torch.Tensor:
    """The skull-stripping mask (1, 1, D, H, W) bool of ``image`` (the brain before artefacts: > 0 inside).

    Exact (the brain's support) when ``pipeline.strip_error_mm`` is (0, 0); otherwise the support smoothed by
    ``STRIP_SMOOTH_MM`` and moved out (> 0: background and ghosts left in) or in (< 0: cortex cut away) by the
    subject's error, drawn uniformly from that range. A blurred flat edge at signed distance d reads
    ``erfc(d / (sigma sqrt 2)) / 2``, so thresholding there moves the surface by d."""
    brain = image > 1e-3
    low, high = pipeline.strip_error_mm
    if low == high == 0:
        return brain
    error = float(np.random.default_rng([noise_seed, STRIP_SEED]).uniform(low, high))
    smooth = _gaussian_blur(brain.to(image.dtype), STRIP_SMOOTH_MM / spacing)
    return smooth > 0.5 * math.erfc(error / (STRIP_SMOOTH_MM * math.sqrt(2.0)))


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    # separable Gaussian of sigma voxels over (1, 1, D, H, W), zero outside
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = kernel.numel()
        padding = [0, 0, 0]
        padding[dim] = radius
        x = F.conv3d(x, kernel.reshape(shape), padding=tuple(padding))
    return x
