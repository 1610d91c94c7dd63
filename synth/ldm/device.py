"""Where and in what precision the LDM runs."""

from __future__ import annotations

import torch

from common.errors import ConfigError
from common.precision import bf16_native


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; CUDA asked for on a machine without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device {name!r} is not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use device=cpu")
    return device


def autocast(device: torch.device, precision: str):
    """bf16 autocast on ``device`` when ``precision == "bf16"``, else a no-op context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def resolve_precision(requested: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` where the device computes in bf16 natively, else ``"fp32"``; a bf16 request on
    a GPU without bf16 falls back to fp32."""
    if requested not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16 or fp32, got {requested!r}")
    native = bf16_native(device)
    if requested == "auto":
        return "bf16" if native else "fp32"
    if requested == "bf16" and device.type == "cuda" and not native:
        return "fp32"
    return requested
