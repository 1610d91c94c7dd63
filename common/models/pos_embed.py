"""Fixed sin-cos position embeddings for 3D token grids, as pure tensor functions.

MAE's 2D embedding (Vaswani-style 1D sin-cos per axis, concatenated) extended to three axes. Channels are
split across the axes D, H, W in that order; each axis needs an even share (half sin, half cos), so the
``embed_dim // 2`` sin/cos pairs are divided as equally as possible and the remainder goes to the first
axes: 768 -> (256, 256, 256), 1024 -> (342, 342, 340), 32 -> (12, 10, 10). ``embed_dim`` must be even, >= 6.
Token order is the raster order of a Conv3d patch embedding flattened over (D, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.errors import ConfigError


def axis_channels(embed_dim: int) -> tuple[int, int, int]:
    """How many channels of ``embed_dim`` encode the D, H and W coordinates (each even, summing to it)."""
    if embed_dim % 2 or embed_dim < 6:
        raise ConfigError(
            f"3D sin-cos position embedding needs an even embed_dim >= 6 (got {embed_dim}); "
            "choose an even width or use pos_embed='learn'"
        )
    pairs = embed_dim // 2
    base, extra = divmod(pairs, 3)
    return tuple(2 * (base + (1 if axis < extra else 0)) for axis in range(3))  # type: ignore[return-value]


def sincos_1d(dim: int, positions: torch.Tensor, temperature: float = 10000.0) -> torch.Tensor:
    """(M,) positions -> (M, dim) embedding: dim/2 sines then dim/2 cosines (MAE's channel order)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / temperature**omega  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(embed_dim: int, grid_size: Sequence[int], cls_token: bool = False) -> torch.Tensor:
    """Fixed position embedding for a (gd, gh, gw) token grid.

    Returns ``(gd*gh*gw, embed_dim)`` float32, or ``(1 + gd*gh*gw, embed_dim)`` with a leading all-zero row
    for the class token when ``cls_token`` (as MAE).
    """
    if len(grid_size) != 3:
        raise ConfigError(f"grid_size must have 3 entries (D, H, W), got {tuple(grid_size)}")
    gd, gh, gw = (int(g) for g in grid_size)
    # 3 x (gd, gh, gw), raster order matches Conv3d output flattened over (D, H, W)
    coords = torch.meshgrid(torch.arange(gd), torch.arange(gh), torch.arange(gw), indexing="ij")
    parts = [
        sincos_1d(dim, coord.reshape(-1)) for dim, coord in zip(axis_channels(embed_dim), coords)
    ]  # 3 x (N, dim_axis)
    emb = torch.cat(parts, dim=1).float()  # (N, embed_dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim), emb], dim=0)  # (1 + N, embed_dim)
    return emb
