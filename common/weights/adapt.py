"""Weight adaptation as pure tensor functions: channel folding, 2D→3D inflation, kernel and position
resampling.

Each takes tensors and target sizes and returns a new tensor; nothing here knows a file format or a model
(timm's ``adapt_input_conv`` / ``resample_abs_pos_embed`` style). The source readers in
``common.weights.sources`` apply them before one strict-shape load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def fold_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(O, I_src, *k) -> (O, in_chans, *k), as timm's ``adapt_input_conv``.

    One target channel sums the source channels, so a grey image repeated to RGB gives the source response;
    more channels repeat the source channels cyclically and rescale by ``I_src / in_chans``.
    """
    src = weight.shape[1]
    if in_chans == src:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / src)
    return weight.repeat(1, reps, *([1] * (weight.ndim - 2)))[:, :in_chans] * (src / in_chans)


def inflate_kernel(weight: torch.Tensor, depth: int, axis: int = 0) -> torch.Tensor:
    """I3D inflation: 2D kernel (O, I, a, b) -> 3D (O, I, k0, k1, k2), ``depth`` taps on spatial ``axis``.

    The 2D kernel is repeated along the new axis and divided by ``depth``, so a volume that is constant along
    that axis gives the 2D response. The two 2D kernel axes fill the other two spatial axes in order.
    """
    if weight.ndim != 4:
        raise ValueError(f"inflate_kernel needs a 2D conv kernel (O, I, kh, kw), got {tuple(weight.shape)}")
    if axis not in (0, 1, 2):
        raise ValueError(f"the inflated axis must be 0 (D), 1 (H) or 2 (W), got {axis}")
    w = weight.unsqueeze(2 + axis)  # (O, I, ..., 1, ...)
    reps = [1] * w.ndim
    reps[2 + axis] = depth
    return w.repeat(*reps) / depth


def resample_kernel(weight: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(O, I, *k_src) -> (O, I, *size): interpolated, rescaled so a constant input keeps its response.

    Used when a patch embedding's patch size differs from the checkpoint's (a VideoMAE 2×16×16 tubelet into a
    16³ patch, a 16² kernel into 8²). Linear interpolation; the mass of each filter is preserved.
    """
    size = tuple(int(s) for s in size)
    src = tuple(weight.shape[2:])
    if len(size) != len(src):
        raise ValueError(f"kernel {tuple(weight.shape)} cannot be resampled to {len(size)}D size {size}")
    if src == size:
        return weight
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    out = F.interpolate(weight.float(), size=size, mode=mode, align_corners=False)
    out = out * (math.prod(src) / math.prod(size))  # mass per filter unchanged, up to interpolation
    return out.to(weight.dtype)


def split_prefix(pos_embed: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, P + N, C) -> prefix (1, P, C), grid tokens (1, N, C)."""
    return pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]


def fit_prefix(prefix: torch.Tensor, num_prefix: int, own_prefix: torch.Tensor) -> torch.Tensor:
    """The source's prefix position rows cut/extended to ``num_prefix``; missing rows from ``own_prefix``."""
    if prefix.shape[1] >= num_prefix:
        return prefix[:, :num_prefix]
    return torch.cat([prefix, own_prefix[:, prefix.shape[1] : num_prefix]], dim=1)


def resample_grid_embed(tokens: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int]) -> torch.Tensor:
    """(1, prod(src_grid), C) -> (1, prod(dst_grid), C), same number of grid axes (2 or 3), raster order.

    Bicubic in 2D (as timm), trilinear in 3D; returned unchanged when the grids are equal.
    """
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    if src_grid == dst_grid:
        return tokens
    if tokens.shape[1] != math.prod(src_grid):
        raise ValueError(f"{tokens.shape[1]} position tokens do not form the grid {src_grid}")
    C = tokens.shape[-1]
    x = tokens.float().reshape(1, *src_grid, C).movedim(-1, 1)  # (1, C, *src_grid)
    mode = "bicubic" if len(src_grid) == 2 else "trilinear"
    x = F.interpolate(x, size=dst_grid, mode=mode, align_corners=False)
    return x.movedim(1, -1).reshape(1, -1, C).to(tokens.dtype)  # (1, prod(dst_grid), C)


def inflate_grid_embed(
    tokens: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int], axis: int = 0
) -> torch.Tensor:
    """2D position tokens (1, gh*gw, C) -> 3D (1, gd*gh'*gw', C): resample to the two non-inflated axes of
    ``dst_grid`` and repeat along ``axis`` (every slice along the inflated axis gets the 2D embedding)."""
    plane = [g for i, g in enumerate(dst_grid) if i != axis]
    x = resample_grid_embed(tokens, src_grid, plane)  # (1, a*b, C)
    C = x.shape[-1]
    x = x.reshape(1, *plane, C).unsqueeze(1 + axis)  # (1, ..., 1, ..., C) with the new axis at 1 + axis
    reps = [1] * x.ndim
    reps[1 + axis] = dst_grid[axis]
    return x.repeat(*reps).reshape(1, -1, C)


def qkv_bias_from_qv(q_bias: torch.Tensor, v_bias: torch.Tensor) -> torch.Tensor:
    """VideoMAE / BEiT keep q and v biases only (k has none): (C,), (C,) -> fused qkv bias (3C,)."""
    return torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
