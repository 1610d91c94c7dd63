"""One attention function with interchangeable backends.

``sdpa`` uses PyTorch's fused kernels (flash / memory-efficient on GPU, fused on CPU), ``xformers`` the
memory-efficient CUDA kernels of xformers, ``math`` two products around an fp32 softmax. ``auto`` picks xformers on
CUDA tensors when it is installed, else sdpa, except for bf16 and fp16 on a CPU over at most ``SHORT_TOKENS``
tokens, where it picks math: there PyTorch's fused CPU kernel costs more than the products it saves (its bf16
backward at 55 tokens, ViT-B/16's visible patches of a 96³ MAE input, took 2-4x math's time on an AVX512-BF16
CPU; ``python -m benchmarks.attention``), and the N x N scores are small. Callers pass ``dropout_p`` only in
training mode (``p if self.training else 0``).
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "xformers", "math")
SHORT_TOKENS = 256  # auto: at most this many tokens in bf16/fp16 on a CPU -> math (see the module docstring)


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None and torch.cuda.is_available()


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype = torch.float32, tokens: int | None = None
) -> str:
    """The concrete backend ``backend`` means for ``tokens`` tokens of ``dtype`` on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda":
            return "xformers" if xformers_available() else "sdpa"
        short = tokens is not None and tokens <= SHORT_TOKENS
        return "math" if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and short else "sdpa"
    if backend == "xformers":
        if device.type != "cuda":
            raise ValueError(
                "attention backend 'xformers' runs on CUDA tensors only; use backend='sdpa' (or 'auto') on "
                f"{device.type}"
            )
        if importlib.util.find_spec("xformers") is None:
            raise ValueError(
                "attention backend 'xformers' needs the xformers package: pip install 'neurotransfer[cuda]'"
            )
    return backend


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention as two products: scores and softmax in float32 whatever the input dtype (bf16 scores of
    magnitude ~10 would move the probabilities by several per cent), the probabilities times ``v`` in ``v``'s
    dtype (a bf16 product accumulates in fp32; rounding probabilities to bf16 moves the output by ~2^-9)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    attn = (q.float() * scale) @ k.float().transpose(-2, -1)  # (B, h, N, N)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    return (attn.to(v.dtype) @ v).to(q.dtype)


def scaled_dot_product(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto", dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v on ``(B, heads, N, head_dim)`` tensors; returns ``(B, heads, N, head_dim)``."""
    if q.ndim != 4:
        raise ValueError(f"attention expects (B, heads, N, head_dim) tensors, got shape {tuple(q.shape)}")
    backend = resolve_backend(backend, q.device, q.dtype, q.shape[-2])
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if backend == "xformers":
        import xformers.ops as xops  # optional (the cuda extra): only when this backend is asked for

        # xformers wants (B, N, heads, head_dim)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p=dropout_p)
        return out.transpose(1, 2)
    return math_attention(q, k, v, dropout_p)
