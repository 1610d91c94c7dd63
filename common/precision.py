"""Precision and device, decided in one place for every package: the words ``auto | bf16 | fp32`` and
``auto | cpu | cuda``, what ``auto`` resolves to, and the autocast context.

On CPUs without AVX512-BF16 or AMX, PyTorch emulates bf16 matmuls and they run several times slower than fp32,
so ``auto`` means bf16 only where the hardware computes it natively. An explicit ``bf16`` is honoured as asked.
"""

from __future__ import annotations

import contextlib
import re

import torch

from common.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")  # auto: bf16 where the hardware computes it natively, else fp32
DEVICES = ("auto", "cpu", "cuda")  # auto: cuda when available, else cpu; cuda:N picks one GPU


def bf16_native(device: str | torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA with bf16; CPUs with AVX512-BF16 or AMX)."""
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    probe = getattr(getattr(torch, device_type, None), "is_bf16_supported", None)  # e.g. torch.xpu
    return bool(probe()) if callable(probe) else False


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` on a machine without it is a ``ConfigError``
    naming ``key`` (the config field)."""
    if name not in DEVICES and not re.fullmatch(r"cuda:\d+", name):
        raise ConfigError(f"{key} must be one of {DEVICES} (or cuda:N), got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def resolve_precision(requested: str, device: str | torch.device, key: str = "precision") -> str:
    """``auto`` -> ``bf16`` where ``device`` computes bf16 natively, else ``fp32``; ``bf16`` and ``fp32`` as
    asked. Anything else is a ``ConfigError`` naming ``key``."""
    if requested not in PRECISIONS:
        raise ConfigError(f"{key} must be one of {PRECISIONS}, got {requested!r}")
    if requested == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return requested


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when the resolved ``precision`` is ``bf16``, else a no-op context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
