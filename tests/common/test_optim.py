"""AdamW's kernel choice: fused where torch has it, with the per-parameter loop's numbers."""

import copy

import torch

from common.optim import adamw, adamw_kernel


def test_fused_adamw_on_cpu_steps_like_the_loop():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    ref = copy.deepcopy(net)
    fast = adamw(net.parameters(), "cpu", lr=1e-2, weight_decay=0.05, betas=(0.9, 0.95))
    loop = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05, betas=(0.9, 0.95), foreach=False)
    assert fast.defaults["fused"] is True
    x = torch.randn(32, 6)
    for _ in range(5):
        for model, opt in ((net, fast), (ref, loop)):
            opt.zero_grad()
            (model(x) - x.sum(1, keepdim=True)).pow(2).mean().backward()
            opt.step()
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_devices_without_a_fused_kernel_get_the_multi_tensor_one():
    assert adamw_kernel("cpu") == {"fused": True} and adamw_kernel(torch.device("cuda", 0)) == {"fused": True}
    assert adamw_kernel("meta") == {"foreach": True}
