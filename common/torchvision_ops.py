"""Import torchvision's Python parts on a CPU-only torch, for the libraries that import it (timm, transformers,
peft).

The PyPI torchvision wheel is built against CUDA torch: with the CPU build its C++ ops do not load, and
torchvision 0.28 then fails at import on two unguarded fake-op registrations (nms, qnms). Declaring those two op
schemas lets the pure-Python parts import; nothing here calls the ops.
"""

from __future__ import annotations

import importlib.util

import torch


def import_torchvision_without_ops() -> None:
    """Import torchvision if installed, declaring the two op schemas it needs when its C++ ops cannot load."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for op in ("nms", "qnms"):
            try:
                torch.library.define(
                    f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
                )
            except RuntimeError:
                pass  # declared already
