"""Whether a device computes bf16 natively, for ``precision: auto`` in pretrain and finetune.

On CPUs without AVX512-BF16 or AMX, PyTorch emulates bf16 matmuls and they run several times slower than fp32,
so ``auto`` means bf16 only where the hardware has it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


def bf16_native(device: str | torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


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
    device: str | torch.device, timings: Callable[[], dict[str, float]] | None = None
) -> tuple[str, str]:
    """What ``precision: auto`` trains in on ``device``, and why (a sentence for the log).

    fp32 where bf16 is not native (emulated bf16 is several times slower). Where it is native, bf16 unless
    ``timings()`` (seconds per step of this model, e.g. from ``step_seconds``; called only then) says bf16 is
    slower: small models, odd shapes or attention kernels without a bf16 path can lose to fp32 even there.
    """
    name = str(device)
    if not bf16_native(device):
        return "fp32", f"{name} has no native bf16 (emulated bf16 is slower than fp32)"
    if timings is None:
        return "bf16", f"{name} computes bf16 natively (not timed)"
    t = timings()
    verdict = "bf16" if t["bf16"] <= t["fp32"] else "fp32"
    why = "not slower" if verdict == "bf16" else "slower for this model"
    return verdict, (
        f"{name} has native bf16 and a step of this model takes {t['bf16']:.3g} s in bf16 vs {t['fp32']:.3g} s "
        f"in fp32: bf16 is {why}"
    )
