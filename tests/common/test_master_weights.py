"""bf16 weights with fp32 masters (``common.master_weights``): which weights turn bf16, that the optimizer steps the
fp32 masters exactly as AdamW steps fp32 weights (clipping included) and keeps updates bf16 would round away,
and that its state (the masters with it) round-trips."""

import copy

import pytest
import torch
from torch import nn

from common.bf16_check import Fp32Conv3d
from common.master_weights import MasterAdamW, bf16_weights, master_values, to_bf16_weights


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3)
        self.kept = nn.Conv3d(4, 4, 1)
        self.kept.__class__ = Fp32Conv3d  # as common.bf16_check.run_in_fp32 leaves it
        self.norm = nn.BatchNorm3d(4)
        self.ln = nn.LayerNorm(4)
        self.token = nn.Parameter(torch.randn(1, 4))
        self.fixed = nn.Parameter(torch.randn(1, 4), requires_grad=False)  # e.g. a sin-cos table, an EMA copy
        self.fc = nn.Linear(4, 1)

    def forward(self, x):  # (B, 1, 5, 5, 5) -> (B, 1)
        x = self.norm(self.kept(self.conv(x))).mean((2, 3, 4))
        return self.fc(self.ln(x + self.token + self.fixed))


def test_trained_weights_turn_bf16_norms_frozen_and_fp32_convolutions_stay_and_come_back_exactly():
    net = Net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with bf16_weights(net):
        dtypes = {n: p.dtype for n, p in net.named_parameters()}
        buffers = {n: b.dtype for n, b in net.named_buffers() if b.is_floating_point()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(torch.rand(2, 1, 5, 5, 5)).float().sum().backward()  # the kept convolution runs in fp32
    assert {n for n, d in dtypes.items() if d == torch.bfloat16} == {
        "conv.weight",
        "conv.bias",
        "token",
        "fc.weight",
        "fc.bias",
    }
    assert set(buffers.values()) == {torch.float32}  # BatchNorm statistics
    assert all(p.dtype == torch.float32 and torch.equal(before[n], p) for n, p in net.named_parameters())
    assert all(p.grad is None or p.grad.dtype == p.dtype for p in net.parameters())


@pytest.mark.parametrize("kernel", [{"fused": True}, {"foreach": True}], ids=["fused", "foreach"])
def test_master_adamw_steps_the_masters_as_adamw_steps_fp32_weights_clipping_included(kernel):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 1))
    net = copy.deepcopy(ref)
    masters = to_bf16_weights(net)
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05, **kernel)
    ours = MasterAdamW([{"params": list(net.parameters())}], masters, max_grad_norm=1.0, **kwargs)
    adamw = torch.optim.AdamW(ref.parameters(), **kwargs)
    for scale in (0.01, 1.0, 100.0, 1.0):  # norms ~0.1 (not clipped), ~10, ~1000, ~10: Adam sees the clipping
        for p, q in zip(net.parameters(), ref.parameters()):  # the same gradients (bf16 values) on both sides
            g = (torch.randn_like(q) * scale).bfloat16()
            p.grad, q.grad = g.to(p.dtype), g.float()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)  # what DeepSpeed does for fp32 weights
        ours.step()
        adamw.step()
    with master_values(masters, net):
        for p, q in zip(net.parameters(), ref.parameters()):
            assert p.dtype == torch.float32
            # ours takes the norm of bf16 gradients in bf16 (3 significant digits per tensor): the clipped
            # steps differ by that much
            torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)
    assert all(torch.equal(p.detach(), m.bfloat16()) for p, m in masters.items())  # the masters rounded to bf16


def test_updates_smaller_than_bf16_can_hold_accumulate_in_the_masters():
    """At lr 1e-5 each step moves a weight near 0.5 by less than half a bf16 step (2^-9): bf16 weights alone
    would not move at all."""
    weight = nn.Parameter(torch.full((64,), 0.5))
    masters = to_bf16_weights(nn.ParameterList([weight]))
    opt = MasterAdamW([weight], masters, lr=1e-5, weight_decay=0.0)
    plain = nn.Parameter(torch.full((64,), 0.5, dtype=torch.bfloat16))
    plain_opt = torch.optim.AdamW([plain], lr=1e-5, weight_decay=0.0)
    for _ in range(300):
        weight.grad = torch.ones(64, dtype=torch.bfloat16)
        plain.grad = torch.ones(64, dtype=torch.bfloat16)
        opt.step()
        plain_opt.step()
    assert torch.equal(plain.detach(), torch.full((64,), 0.5, dtype=torch.bfloat16))  # bf16 alone: stalled
    torch.testing.assert_close(0.5 - masters[weight], torch.full((64,), 300 * 1e-5), rtol=0.01, atol=0)
    assert torch.equal(weight.detach(), masters[weight].bfloat16())


def test_a_checkpoint_of_the_masters_and_its_state_resumes_exactly():
    """As the engine saves: the module's weights through ``master_values`` (the fp32 masters), and the optimizer's
    state (torch's AdamW layout)."""
    torch.manual_seed(0)
    net = nn.Linear(8, 8)
    masters = to_bf16_weights(net)
    opt = MasterAdamW(net.parameters(), masters, lr=1e-3)
    for _ in range(2):
        net.weight.grad, net.bias.grad = torch.randn(8, 8).bfloat16(), torch.randn(8).bfloat16()
        opt.step()
    with master_values(masters, net):
        weights = copy.deepcopy(net.state_dict())
    assert weights["weight"].dtype == torch.float32
    state = copy.deepcopy(opt.state_dict())
    other = nn.Linear(8, 8)
    other_masters = to_bf16_weights(other)
    resumed = MasterAdamW(other.parameters(), other_masters, lr=1e-3)
    with master_values(other_masters, other):
        other.load_state_dict(weights)
    resumed.load_state_dict(state)
    for p, q in zip(net.parameters(), other.parameters()):
        assert torch.equal(masters[p], other_masters[q]) and torch.equal(p.detach(), q.detach())
    grads = torch.randn(8, 8).bfloat16(), torch.randn(8).bfloat16()
    for model, o in ((net, opt), (other, resumed)):
        model.weight.grad, model.bias.grad = grads
        o.step()
    assert all(torch.equal(masters[p], other_masters[q]) for p, q in zip(net.parameters(), other.parameters()))
