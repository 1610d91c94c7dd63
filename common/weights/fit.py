"""Fit a renamed source state dict to a model's shapes: the one place the adapters in ``adapt`` are applied.

Every source reader renames keys to the model's names; ``fit_state`` then folds input channels, inflates 2D
kernels, resamples the patch kernel and the position embedding, and records each change in the report. Any
other shape mismatch is an error: nothing is loaded silently wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from common.errors import CheckpointError
from common.weights.adapt import (
    fit_prefix,
    fold_input_channels,
    inflate_grid_embed,
    inflate_kernel,
    resample_grid_embed,
    resample_kernel,
    split_prefix,
)
from common.weights.report import LoadReport

PATCH_KERNEL = "patch_embed.proj.weight"
POS_EMBED = "pos_embed"


@dataclass
class SourceLayout:
    """What a reader knows about the source beyond its tensors."""

    pos_grid: tuple[int, ...] | None = None  # the source's token grid (2D or 3D) of its pos_embed, if known
    num_prefix: int = 0  # prefix rows (cls token) at the start of the source's pos_embed
    axis: int = 0  # spatial axis (0 D, 1 H, 2 W) a 2D source is inflated along / a video's time goes to
    notes: list[str] = field(default_factory=list)  # what the reader did or found that a user must know


def model_prefix(model: nn.Module) -> str:
    """'net.' for the CNN wrappers that keep MONAI's names under ``net``; '' otherwise."""
    keys = list(model.state_dict())
    return "net." if keys and all(k.startswith("net.") for k in keys) else ""


def _shape(t: torch.Tensor | Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in (t.shape if isinstance(t, torch.Tensor) else t)) + ")"


def _fit_conv(key: str, src: torch.Tensor, own: torch.Tensor, layout: SourceLayout, report: LoadReport):
    """A conv kernel of another dimensionality, kernel size or channel count -> own's shape, or None."""
    w = src
    if w.ndim == 4 and own.ndim == 5:  # 2D -> 3D: the 2D axes go to the non-inflated axes, then I3D
        plane = [s for i, s in enumerate(own.shape[2:]) if i != layout.axis]
        if list(w.shape[2:]) != plane:
            if not key.endswith(PATCH_KERNEL):
                return None
            w = resample_kernel(w, plane)
        w = inflate_kernel(w, own.shape[2 + layout.axis], layout.axis)
        w = fold_input_channels(w, own.shape[1])
        report.inflated[key] = f"2D {_shape(src)} -> 3D {_shape(w)} along axis {'DHW'[layout.axis]}"
        return w
    if w.ndim == own.ndim == 5 and w.shape[0] == own.shape[0]:
        if w.shape[2:] != own.shape[2:]:
            if not key.endswith(PATCH_KERNEL):
                return None
            w = resample_kernel(w, own.shape[2:])
        w = fold_input_channels(w, own.shape[1])
        report.resized[key] = f"{_shape(src)} -> {_shape(w)}"
        return w
    return None


def _fit_pos_embed(
    key: str, src: torch.Tensor, own: torch.Tensor, model: nn.Module, layout: SourceLayout, report: LoadReport
):
    own_prefix_n = getattr(model, "num_prefix_tokens", 0)
    grid = tuple(getattr(model, "grid_size", ()))
    if src.ndim != 3 or src.shape[-1] != own.shape[-1] or len(grid) != 3:
        return None
    prefix, tokens = split_prefix(src, layout.num_prefix)
    src_grid = layout.pos_grid or _cube_grid(tokens.shape[1], grid)
    if src_grid is None or math.prod(src_grid) != tokens.shape[1]:
        raise CheckpointError(
            f"{report.source}: cannot tell the token grid of {key} {_shape(src)} "
            f"({tokens.shape[1]} tokens after {layout.num_prefix} prefix rows); import from an export, whose "
            "metadata holds the input size"
        )
    if len(src_grid) == 2:
        tokens = inflate_grid_embed(tokens, src_grid, grid, layout.axis)
    else:
        tokens = resample_grid_embed(tokens, src_grid, grid)
    own_prefix, _ = split_prefix(own, own_prefix_n)
    out = torch.cat([fit_prefix(prefix, own_prefix_n, own_prefix), tokens], dim=1)
    report.resized[key] = f"grid {src_grid}+{layout.num_prefix} prefix -> grid {grid}+{own_prefix_n} prefix"
    return out


def _cube_grid(n: int, grid: tuple[int, ...]) -> tuple[int, ...] | None:
    if n == math.prod(grid):
        return grid
    side = round(n ** (1 / 3))
    return (side,) * 3 if side**3 == n else None


def fit_state(
    state: Mapping[str, torch.Tensor], model: nn.Module, layout: SourceLayout, report: LoadReport
) -> dict[str, torch.Tensor]:
    """Adapt ``state`` (model key names) to the model's shapes and fill the report's key lists.

    Returns the tensors to load. Raises ``CheckpointError`` listing every tensor whose shape cannot be fitted.
    """
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for key, src in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key]
        if tuple(src.shape) == tuple(target.shape):
            out[key] = src
            continue
        if key.endswith(POS_EMBED) and key.count(".") == model_prefix(model).count("."):
            fitted = _fit_pos_embed(key, src, target, model, layout, report)
        elif src.ndim >= 4 and target.ndim == 5:
            fitted = _fit_conv(key, src, target, layout, report)
        else:
            fitted = None
        if fitted is None or tuple(fitted.shape) != tuple(target.shape):
            bad.append(f"{key}: source {_shape(src)} vs model {_shape(target)}")
            continue
        out[key] = fitted
    if bad:
        raise CheckpointError(
            f"{report.source}: {len(bad)} tensor(s) do not fit the model and cannot be adapted — "
            + "; ".join(bad)
            + ". Check that the init matches the backbone (architecture, width, depth)."
        )
    report.loaded = sorted(out)
    report.notes.extend(layout.notes)
    report.missing = sorted(k for k in own if k not in out and not k.endswith("num_batches_tracked"))
    report.unexpected = sorted(report.unexpected)
    return {k: v.to(own[k].dtype) for k, v in out.items()}
