"""bf16 weights with fp32 masters: what a bf16 training step computes with, and what its optimizer updates.

Under bf16 autocast with fp32 weights, every step casts each weight to bf16 for the forward (a copy kept for the
backward) and each weight gradient back to fp32: two passes over all weights and a bf16 copy of the model beside
the fp32 one. Here the trained weights are *stored* in bf16, so the forward and backward use them as they are;
their fp32 values (the masters) live in the optimizer (``MasterAdamW``), which steps them with torch's fused
AdamW and writes the rounded result back (DeepSpeed's ``bf16`` mode, without its per-parameter Python loops and
its fp32 copy of every gradient at once). Autocast stays on around the forward: it casts the fp32 inputs, the
frozen fp32 weights (a MoCo momentum encoder, whose EMA would stall in bf16) and fp32 activations where a
product needs bf16, and keeps its fp32 ops in fp32. Losses compute in fp32 (the objectives cast to ``float``).

What stays fp32 (``KEPT_FP32``): normalisation layers (their statistics and affine parameters: CPU and CUDA
kernels take a bf16 input with fp32 parameters and reduce in fp32) and the convolutions
``common.bf16_check`` moved to fp32 (``Fp32Conv3d`` computes in fp32 and needs fp32 weights).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.optim.adamw import adamw as functional_adamw

from common.bf16_check import FP32_CONV

KEPT_FP32 = (nn.LayerNorm, nn.GroupNorm, _BatchNorm, _InstanceNorm, *FP32_CONV.values())
CHUNK_ELEMENTS = 2**21  # masters stepped per fused call: their fp32 gradients stay in cache (and are all that is
# allocated at once) between the cast, the update and the write-back; 8 MiB of fp32


def to_bf16_weights(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """Store ``model``'s trained fp32 parameters in bf16 (in place: same ``Parameter`` objects), except those of
    ``KEPT_FP32`` modules; returns {parameter: its fp32 values before}, the masters."""
    masters: dict[nn.Parameter, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, KEPT_FP32):
            continue
        for p in module.parameters(recurse=False):
            if p.requires_grad and p.dtype == torch.float32 and p not in masters:
                masters[p] = p.data
                p.data = p.data.to(torch.bfloat16)
    return masters


def restore(masters: dict[nn.Parameter, torch.Tensor]) -> None:
    """Put the fp32 ``masters`` back as their parameters' values (the inverse of ``to_bf16_weights``)."""
    for p, master in masters.items():
        p.data = master
        p.grad = None  # a bf16 gradient cannot accumulate into an fp32 parameter


@contextlib.contextmanager
def bf16_weights(model: nn.Module) -> Iterator[None]:
    """``model`` with bf16 weights inside the block, exactly its fp32 weights again after it (for timing a step)."""
    masters = to_bf16_weights(model)
    try:
        yield
    finally:
        restore(masters)


@contextlib.contextmanager
def master_values(masters: dict[nn.Parameter, torch.Tensor], module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with its parameters showing their fp32 masters inside the block: an export or a checkpoint
    saves the fp32 values, and loading a checkpoint into it sets the masters exactly. After the block the
    parameters hold bf16 again, the masters rounded (new ones if the block loaded some)."""
    swapped = [(p, p.data) for p in module.parameters() if p in masters]
    for p, _ in swapped:
        p.data = masters[p]
    try:
        yield module
    finally:
        with torch.no_grad():
            for p, stored in swapped:
                p.data = stored.copy_(masters[p])


class MasterAdamW(torch.optim.AdamW):
    """AdamW on the fp32 masters of bf16 parameters (``to_bf16_weights``), with clipping folded into the update.

    ``params`` are the model's parameters, or groups of them as for ``torch.optim.AdamW``; those in ``masters``
    are stepped through their fp32 master, the rest (fp32 already: norms, fp32 convolutions) directly. ``step``
    takes the gradients the backward left on the model's parameters (bf16 for bf16 weights), clips them to
    ``max_grad_norm`` by one global norm (0: no clipping) through the fused kernel's ``grad_scale`` (no pass
    scaling the gradients), and updates the masters a chunk at a time: the chunk's gradients are cast into one
    reused fp32 buffer, stepped by torch's AdamW (``fused``/``foreach`` as given) and the chunk written back to
    the model rounded to bf16 while it is in cache. Its state is ``torch.optim.AdamW``'s; the masters are saved
    and restored as the module's own weights, through ``master_values``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        masters: dict[nn.Parameter, torch.Tensor],
        max_grad_norm: float = 0.0,
        **kwargs: Any,
    ):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [{**g, "params": list(g["params"])} for g in groups]
        # master -> the model parameter it feeds (itself for a parameter that is fp32 already)
        self.model_param: dict[torch.Tensor, nn.Parameter] = {masters.get(p, p): p for g in groups for p in g["params"]}
        super().__init__([{**g, "params": [masters.get(p, p) for p in g["params"]]} for g in groups], **kwargs)
        if self.defaults["amsgrad"] or self.defaults["maximize"]:
            raise ValueError("MasterAdamW implements AdamW without amsgrad and maximize")
        self.max_grad_norm = max_grad_norm
        self._buffer: torch.Tensor | None = None  # one chunk's fp32 gradients, reused every step

    def _masters(self) -> list[torch.Tensor]:
        return [m for group in self.param_groups for m in group["params"]]

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("MasterAdamW.step takes no closure")
        grads = {m: self.model_param[m].grad for m in self._masters() if self.model_param[m].grad is not None}
        if not grads:
            return
        scale = None
        if self.max_grad_norm > 0:  # per-tensor norms in the gradients' dtype (accumulated in fp32 by the kernel)
            norms = torch._foreach_norm(list(grads.values()), 2)
            norm = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
            scale = torch.clamp((norm + 1e-6) / self.max_grad_norm, min=1.0)  # DeepSpeed's clip coefficient, inverted
        size, device = max(CHUNK_ELEMENTS, max(m.numel() for m in grads)), next(iter(grads)).device
        if self._buffer is None or self._buffer.numel() < size or self._buffer.device != device:
            self._buffer = torch.empty(size, dtype=torch.float32, device=device)
        for group in self.param_groups:
            chunk, used = [], 0
            for m in [m for m in group["params"] if m in grads]:
                if chunk and used + m.numel() > self._buffer.numel():
                    self._step_chunk(group, chunk, grads, scale)
                    chunk, used = [], 0
                chunk.append(m)
                used += m.numel()
            if chunk:
                self._step_chunk(group, chunk, grads, scale)

    def _step_chunk(self, group: dict, chunk: list[torch.Tensor], grads: dict, scale: torch.Tensor | None) -> None:
        """AdamW on the masters of ``chunk``, their gradients cast into the buffer."""
        views, offset = [], 0
        for m in chunk:
            views.append(self._buffer[offset : offset + m.numel()].view_as(m))
            offset += m.numel()
        torch._foreach_copy_(views, [grads[m] for m in chunk])  # bf16 -> fp32; fp32 ones copied, left as they were
        fused = bool(group["fused"])
        if scale is not None and not fused:  # kernels without grad_scale (foreach) divide here
            torch._foreach_div_(views, scale)
        for m in chunk:
            if not self.state[m]:  # torch.optim.AdamW's state layout
                self.state[m]["step"] = torch.zeros((), dtype=torch.float32, device=m.device)
                self.state[m]["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
                self.state[m]["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
        state = [self.state[m] for m in chunk]
        beta1, beta2 = group["betas"]
        functional_adamw(
            chunk,
            views,
            [s["exp_avg"] for s in state],
            [s["exp_avg_sq"] for s in state],
            [],
            [s["step"] for s in state],
            foreach=not fused,
            fused=fused,
            grad_scale=scale if fused else None,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
        copies = [m for m in chunk if self.model_param[m] is not m]
        if copies:
            torch._foreach_copy_([self.model_param[m].data for m in copies], copies)  # rounded to bf16

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_param.values():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
