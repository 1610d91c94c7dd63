"""Whether a device computes bf16 natively, for ``precision: auto`` in pretrain and finetune.

On CPUs without AVX512-BF16 or AMX, PyTorch emulates bf16 matmuls and they run several times slower than fp32,
so ``auto`` means bf16 only where the hardware has it.
"""

from __future__ import annotations

import torch


def bf16_native(device: str | torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False
