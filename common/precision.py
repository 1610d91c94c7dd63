"""Precision and device, decided in one place for every package: the words ``auto | bf16 | fp32`` and
``auto | cpu | cuda``, what ``auto`` resolves to, and the autocast context.

On CPUs without AVX512-BF16 or AMX, PyTorch emulates bf16 matmuls and they run several times slower than fp32,
so ``auto`` means bf16 only where the hardware computes it natively. An explicit ``bf16`` is honoured as asked.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable

import torch

from common.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")  # auto: bf16 where the hardware computes it natively, else fp32
DEVICES = ("auto", "cpu", "cuda")  # auto: cuda when available, else cpu; cuda:N picks one GPU


def bf16_native(device: str | torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA with bf16; CPUs with AVX512-BF16 or AMX)."""
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if device_type == "cuda":  # by default torch also says yes where bf16 is only emulated (pre-Ampere)
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
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


def step_seconds(
    step: Callable[[str], object], device: str | torch.device, precisions=("fp32", "bf16"), rounds: int = 2
) -> dict[str, float]:
    """Seconds of one ``step(precision)`` for each precision: a warm-up call each, then ``rounds`` calls each,
    alternated so that load from other processes hits both alike; the fastest call counts."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = {p: math.inf for p in precisions}
    for p in precisions:
        step(p)
    for _ in range(rounds):
        for p in precisions:
            sync()
            start = time.perf_counter()
            step(p)
            sync()
            best[p] = min(best[p], time.perf_counter() - start)
    return best


def choose_precision(
    device: str | torch.device,
    timings: Callable[[], dict[str, float]] | None = None,
    check: Callable[[], tuple[bool, str]] | None = None,
) -> tuple[str, str]:
    """What ``precision: auto`` trains in on ``device``, and why (a sentence for the log).

    fp32 where bf16 is not native (emulated bf16 is several times slower). Where it is native, bf16 only if
    ``check()`` (the model's own bf16 step against fp32, ``common.bf16_check.self_check``; called only then)
    passes, and unless ``timings()`` (seconds per step of this model, e.g. from ``step_seconds``) says bf16 is
    slower: small models, odd shapes or attention kernels without a bf16 path can lose to fp32 even there.
    """
    name = str(device)
    if not bf16_native(device):
        return "fp32", f"{name} has no native bf16 (emulated bf16 is slower than fp32)"
    checked = ""
    if check is not None:
        passed, detail = check()
        if not passed:
            return "fp32", f"{name} has native bf16, but this model's bf16 step fails the check against fp32: {detail}"
        checked = f"; its bf16 step passes the check against fp32 ({detail})"
    if timings is None:
        return "bf16", f"{name} computes bf16 natively (not timed){checked}"
    t = timings()
    verdict = "bf16" if t["bf16"] <= t["fp32"] else "fp32"
    why = "not slower" if verdict == "bf16" else "slower for this model"
    return verdict, (
        f"{name} has native bf16 and a step of this model takes {t['bf16']:.3g} s in bf16 vs {t['fp32']:.3g} s "
        f"in fp32: bf16 is {why}{checked}"
    )
