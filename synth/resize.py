"""Trilinear resizing as one small matrix product per axis.

Linear interpolation along an axis is a sparse (n_out, n_in) matrix; applying it with dense BLAS matmuls, one
axis at a time, is 2-3x faster on CPU than ``F.interpolate(mode="trilinear")`` for the large upsamples the
generator does per volume (a coarse lattice to the full output grid). Results agree with ``F.interpolate`` to
float precision.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=64)
def interpolation_matrix(n_in: int, n_out: int, align_corners: bool) -> torch.Tensor:
    """(n_out, n_in) float32 weights of 1-D linear interpolation, as ``F.interpolate`` defines it."""
    out = torch.arange(n_out, dtype=torch.float64)
    if align_corners:
        pos = out * ((n_in - 1) / max(n_out - 1, 1))
    else:
        pos = ((out + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    lo = pos.floor().long().clamp(0, n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    w = (pos - lo).clamp(0.0, 1.0)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), lo] += 1.0 - w
    m[torch.arange(n_out), hi] += w
    return m.float()


def resize(x: torch.Tensor, size: tuple[int, int, int], align_corners: bool) -> torch.Tensor:
    """``(C, d, h, w)`` -> ``(C, *size)`` trilinear; axes already at their size are left alone."""
    c, d, h, w = x.shape
    D, H, W = size
    on = x.device  # the matrices are cached on the CPU; a few KB to copy for a CUDA input
    if w != W:
        x = x @ interpolation_matrix(w, W, align_corners).to(on).T  # (C, d, h, W)
    if h != H:
        x = interpolation_matrix(h, H, align_corners).to(on) @ x  # (C, d, H, W)
    if d != D:
        x = (interpolation_matrix(d, D, align_corners).to(on) @ x.reshape(c, d, -1)).reshape(c, D, H, W)
    return x
