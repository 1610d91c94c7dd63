"""bf16 checked before a model trains in it: a convolution whose bf16 kernel is wrong at the shape the model feeds
it computes in fp32 instead, and ``auto`` keeps bf16 only where the model's own bf16 step matches fp32. A faulty
kernel is simulated, so this runs on any CPU; the real one (oneDNN's, on AVX512-BF16 CPUs) is checked where it
exists."""

import os

import pytest
import torch
from torch import nn
from torch.nn.functional import cosine_similarity

from common import bf16_check, precision
from common.bf16_check import (
    Fp32Conv3d,
    faulty_convolutions,
    gradient_cosines,
    kernel_error,
    run_in_fp32,
    self_check,
    train_precision,
)


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    """Each test sees kernels checked anew: verdicts are kept per process, and some tests simulate a fault."""
    monkeypatch.setattr(bf16_check, "_VERDICTS", {})


FAULTY_SHAPE = (4, 8, 4, 4, 4)  # the input shape whose simulated bf16 kernel returns garbage


class Net(nn.Module):
    """Two convolutions at two input sizes: the second sees (B, 8, 4, 4, 4)."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Conv3d(1, 8, 3, stride=2, padding=1)  # (B, 1, 8, 8, 8) -> (B, 8, 4, 4, 4)
        self.deep = nn.Conv3d(8, 8, 3, padding=1)
        self.norm = nn.BatchNorm3d(8)
        self.fc = nn.Linear(8, 1)

    def forward(self, x):
        x = self.norm(self.deep(torch.relu(self.wide(x))))
        return self.fc(x.float().mean((2, 3, 4)))


def simulate_faulty_kernel(monkeypatch):
    """bf16 weight gradients of inputs shaped ``FAULTY_SHAPE`` are garbage, as oneDNN's are at such shapes."""
    sound = bf16_check._conv_pass

    def conv_pass(conv, x, w, grad_out):
        out = sound(conv, x, w, grad_out)
        if x.dtype == torch.bfloat16 and tuple(x.shape) == FAULTY_SHAPE:
            out[2] = torch.full_like(out[2], 3e38)
        return out

    monkeypatch.setattr(bf16_check, "_conv_pass", conv_pass)


def batch():
    return torch.rand(4, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))


def loss(model):
    return model(batch()).square().mean()


def test_only_the_convolution_whose_kernel_fails_at_its_shape_is_found_and_moved_to_fp32(monkeypatch):
    simulate_faulty_kernel(monkeypatch)
    torch.manual_seed(0)
    model = Net()
    keys = list(model.state_dict())
    faulty = faulty_convolutions(model, loss)
    assert list(faulty) == ["deep"] and "input (4, 8, 4, 4, 4)" in faulty["deep"] and "inf" in faulty["deep"]
    run_in_fp32(model, faulty)
    assert type(model.deep) is Fp32Conv3d and type(model.wide) is nn.Conv3d
    assert isinstance(model.deep, nn.Conv3d) and list(model.state_dict()) == keys  # checkpoints load as before
    x = torch.rand(4, 8, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moved, kept = model.deep(x), model.wide(batch())
    assert moved.dtype == torch.float32 and kept.dtype == torch.bfloat16
    torch.testing.assert_close(moved, nn.functional.conv3d(x, model.deep.weight, model.deep.bias, padding=1))


def test_a_cpu_convolution_over_an_extent_below_its_kernel_moves_to_fp32_without_running_its_kernel(monkeypatch):
    """oneDNN's faulty bf16 weight gradient also writes outside its buffers there: it must not run even once."""

    ran = []
    monkeypatch.setattr(bf16_check, "kernel_error", lambda conv, shape, trials=1: ran.append(conv) or 0.0)
    model = nn.Sequential(*(nn.Conv3d(c, 4, 3, stride=2, padding=1) for c in (1, 4)), nn.Conv3d(4, 4, 1))
    faulty = faulty_convolutions(model, lambda m: m(torch.rand(2, 1, 8, 8, 8)))  # 8³ -> 4³ -> 2³ -> 2³
    assert list(faulty) == ["1"] and "extent below the kernel" in faulty["1"]  # a 1³ kernel fits any extent
    assert model[1] not in ran and model[0] in ran and model[2] in ran
    # depth 2 alone (as in a ResNet's layer4 at 40 x 48 x 40 voxels), or an output extent below the kernel
    assert bf16_check.below_kernel(nn.Conv3d(4, 4, 3, padding=1), (2, 4, 2, 6, 5))
    assert bf16_check.below_kernel(nn.Conv3d(4, 4, 3, stride=2, padding=1), (2, 4, 3, 3, 3))  # output 2³
    assert not bf16_check.below_kernel(nn.Conv3d(4, 4, 3, stride=2, padding=1), (2, 4, 5, 6, 5))
    assert not bf16_check.below_kernel(nn.Conv3d(1, 4, 7, stride=2, padding=3), (2, 1, 40, 48, 40))


def test_the_kernel_check_leaves_the_model_and_the_random_stream_as_they_were(monkeypatch):
    simulate_faulty_kernel(monkeypatch)
    model = Net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    faulty_convolutions(model, loss)
    self_check(model, loss, "cpu")
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in model.parameters())


def test_the_gradient_cosines_are_those_of_the_concatenated_gradients():
    """``self_check`` sums per-tensor products in float64 instead of concatenating every gradient (a copy of the
    whole model twice over): the same cosines as the flat vectors', to float rounding, bf16 gradients included."""
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (64, 32), "b": (32,), "conv": (8, 4, 3, 3, 3), "zero": (4, 4), "tiny": (1,)}
    grads32 = {n: torch.randn(s, generator=g) * (n != "zero") for n, s in shapes.items()}
    for noise in (0.1, 1.0, 3.0):
        for dtype in (torch.float32, torch.bfloat16):
            grads16 = {n: (v + noise * torch.randn(v.shape, generator=g)).to(dtype) for n, v in grads32.items()}
            flat = lambda grads: torch.cat([v.float().flatten() for v in grads.values()])
            total, weights = gradient_cosines(grads16, grads32)
            assert total == pytest.approx(float(cosine_similarity(flat(grads16), flat(grads32), dim=0, eps=1e-30)))
            assert weights.keys() == {"w", "conv"}  # 2-D and up, fp32 gradient not all zero
            for n, cos in weights.items():
                expected = cosine_similarity(grads16[n].float().flatten(), grads32[n].flatten(), dim=0, eps=1e-30)
                assert cos == pytest.approx(float(expected), abs=1e-6)


def proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_rss_growth(run) -> int:
    """Bytes by which this process's peak resident memory rose above its resident memory while ``run()`` ran."""
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS now
        f.write("5")
    before = proc_status_bytes("VmRSS")
    run()
    return proc_status_bytes("VmHWM") - before


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable VmHWM")
def test_the_self_check_holds_no_copy_of_the_gradients_beyond_its_two_passes():
    """At start-up the check's peak sets the run's peak where it exceeds training's: it holds fp32's gradients and
    then bf16's (and autocast's bf16 weights), no clones and no concatenation of them. Measured: 2.3x the fp32
    weights' bytes; 7.2x with clones and flat copies (a ViT-B MAE's start-up at 96³: 3.79 GiB, now 1.75 GiB)."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(16)))  # 64 MiB of weights, tiny activations
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randn(4, 1024)
    loss = lambda m: m(x).square().mean()
    self_check(model, loss, "cpu")  # the allocator's first growth is not the check's
    assert peak_rss_growth(lambda: self_check(model, loss, "cpu")) < 3.5 * weights


class GarbageGradient(torch.autograd.Function):
    """Identity forward; a backward that returns noise, as a faulty bf16 kernel does."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.randn_like(grad) * grad.abs().max() * 100


class FaultyInBf16(Net):
    """A model whose gradients are wrong only when it runs under bf16 autocast."""

    def forward(self, x):
        x = torch.relu(self.wide(x))
        if torch.is_autocast_enabled("cpu"):
            x = GarbageGradient.apply(x)
        return self.fc(self.norm(self.deep(x)).float().mean((2, 3, 4)))


def test_auto_keeps_fp32_where_the_models_bf16_step_fails_the_check_and_says_why(monkeypatch):
    monkeypatch.setattr(precision, "bf16_native", lambda device: True)
    torch.manual_seed(0)
    chosen, why = train_precision("auto", FaultyInBf16(), loss, "cpu")
    assert chosen == "fp32" and "fails the check against fp32" in why and "gradient cosine" in why
    torch.manual_seed(0)
    chosen, why = train_precision("auto", Net(), loss, "cpu")
    assert chosen == "bf16" and "passes the check against fp32" in why


def test_auto_moves_the_faulty_convolution_to_fp32_then_trains_in_bf16(monkeypatch):
    monkeypatch.setattr(precision, "bf16_native", lambda device: True)
    simulate_faulty_kernel(monkeypatch)
    model = Net()
    chosen, why = train_precision("auto", model, loss, "cpu", timings=lambda: {"fp32": 1.0, "bf16": 0.5})
    assert chosen == "bf16" and type(model.deep) is Fp32Conv3d
    assert (
        "1 convolution(s) whose bf16 kernel failed its check compute in fp32" in why
        and "deep (input (4, 8, 4, 4, 4)" in why
    )


def test_an_explicit_bf16_is_honoured_with_a_warning_and_fp32_checks_nothing(monkeypatch, caplog):
    chosen, why = train_precision("bf16", FaultyInBf16(), loss, "cpu")
    assert chosen == "bf16" and "FAILS the check" in why
    assert "bf16 as asked, but this model's bf16 step fails the check" in caplog.text

    def untouchable(model):
        raise AssertionError("fp32 runs no check")

    assert train_precision("fp32", Net(), untouchable, "cpu") == ("fp32", "fp32 as asked")
    monkeypatch.setattr(precision, "bf16_native", lambda device: False)
    chosen, why = train_precision("auto", Net(), untouchable, "cpu")
    assert chosen == "fp32" and "no native bf16" in why


def test_every_rank_decides_alike():
    """A convolution found faulty on any rank moves on all; the check must pass on every rank."""
    model = Net()
    gather = lambda value: [value, {"deep": "deep (found on rank 1)"} if isinstance(value, dict) else False]
    chosen, why = train_precision("bf16", model, loss, "cpu", gather=gather)
    assert type(model.deep) is Fp32Conv3d and "found on rank 1" in why and "FAILS the check" in why


@pytest.mark.skipif(not precision.bf16_native("cpu"), reason="the faulty oneDNN kernel needs a CPU with native bf16")
def test_the_real_onednn_kernel_fault_is_where_the_rule_says():
    """torch 2.13 + oneDNN on AVX512-BF16: the bf16 weight gradient of a 3³ convolution over a depth-2 input is
    garbage (docs/precision.md); a larger input is sound. Fails once a torch release fixes the kernel: then the
    rule (``below_kernel``) can go."""
    torch.manual_seed(0)
    conv = nn.Conv3d(64, 64, 3, padding=1, bias=False)
    assert kernel_error(conv, (8, 64, 2, 2, 2), trials=5) > bf16_check.CONV_TOLERANCE
    assert kernel_error(conv, (8, 64, 6, 6, 6)) < bf16_check.CONV_TOLERANCE


def test_a_geometrys_verdict_is_kept_for_the_next_fold(monkeypatch):
    """A grid checks every fold's model: a geometry checked once is not run again."""
    ran = []
    monkeypatch.setattr(bf16_check, "kernel_error", lambda conv, shape, trials=1: ran.append(conv) or 0.0)
    for _ in range(2):
        faulty_convolutions(Net(), loss)
    assert len(ran) == 2  # the two convolutions' geometries, once each
