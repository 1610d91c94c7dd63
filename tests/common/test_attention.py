"""Attention backends agree with the reference, and dropout stays out of eval."""

from __future__ import annotations

import pytest
import torch

from common.attention import SHORT_TOKENS, resolve_backend, scaled_dot_product, xformers_available
from common.models.vit import Attention


def qkv(dtype=torch.float32, device="cpu", shape=(2, 3, 50, 16), requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(device, dtype).requires_grad_(requires_grad) for _ in range(3)]


def forward_backward(backend, tensors):
    out = scaled_dot_product(*tensors, backend=backend)
    out.float().square().sum().backward()
    return out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sdpa_matches_math(dtype, tol):
    out_ref, grads_ref = forward_backward("math", qkv(dtype, requires_grad=True))
    out, grads = forward_backward("sdpa", qkv(dtype, requires_grad=True))
    assert out.dtype == dtype and out.shape == (2, 3, 50, 16)
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=tol, atol=tol)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.float(), g_ref.float(), rtol=tol, atol=tol)


@pytest.mark.skipif(not xformers_available(), reason="xformers runs on CUDA only and needs the xformers package")
def test_xformers_matches_math():
    out_ref, grads_ref = forward_backward("math", qkv(torch.float16, "cuda", requires_grad=True))
    out, grads = forward_backward("xformers", qkv(torch.float16, "cuda", requires_grad=True))
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=2e-2, atol=2e-2)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.float(), g_ref.float(), rtol=2e-2, atol=2e-2)


def test_auto_picks_sdpa_on_cpu_but_math_for_few_bf16_tokens():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa"
    assert resolve_backend("auto", cpu, torch.float32, 55) == "sdpa"
    assert resolve_backend("auto", cpu, torch.bfloat16, 55) == "math"
    assert resolve_backend("auto", cpu, torch.bfloat16, SHORT_TOKENS) == "math"
    assert resolve_backend("auto", cpu, torch.bfloat16, SHORT_TOKENS + 1) == "sdpa"
    assert resolve_backend("sdpa", cpu, torch.bfloat16, 55) == "sdpa"  # an explicit backend is kept


def test_math_in_bf16_is_as_close_to_exact_attention_as_sdpa():
    """Scores and softmax in fp32: bf16 scores of magnitude ~10 would be off by several per cent (max error
    ~0.1 on these inputs, against ~0.02 for SDPA's fused kernel)."""
    q, k, v = (2 * t for t in qkv(torch.bfloat16, shape=(2, 4, 55, 64)))
    exact = scaled_dot_product(q.double(), k.double(), v.double(), backend="sdpa")
    errors = {b: (scaled_dot_product(q, k, v, backend=b).double() - exact).abs().max().item() for b in ("math", "sdpa")}
    assert errors["math"] <= max(0.04, 2 * errors["sdpa"]), errors


def test_xformers_on_cpu_says_to_use_sdpa():
    with pytest.raises(ValueError, match="CUDA tensors only; use backend='sdpa'"):
        scaled_dot_product(*qkv(), backend="xformers")


def test_bad_backend_and_shape_are_rejected():
    with pytest.raises(ValueError, match="not one of"):
        scaled_dot_product(*qkv(), backend="flash")
    with pytest.raises(ValueError, match=r"\(B, heads, N, head_dim\)"):
        scaled_dot_product(*[t[0] for t in qkv()])


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_dropout_only_in_training(backend):
    torch.manual_seed(0)
    dropped = Attention(32, num_heads=4, attn_drop=0.5, backend=backend)
    clean = Attention(32, num_heads=4, attn_drop=0.0, backend=backend)
    clean.load_state_dict(dropped.state_dict())
    x = torch.randn(2, 10, 32)
    dropped.eval(), clean.eval()
    torch.testing.assert_close(dropped(x), clean(x))  # eval: no dropout, deterministic
    torch.testing.assert_close(dropped(x), dropped(x))
    dropped.train()
    assert not torch.allclose(dropped(x), clean(x))  # training: attention weights are dropped
