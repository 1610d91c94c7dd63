"""bf16 checked before a model trains in it.

Two checks, both against fp32:
1. **Each convolution's bf16 kernels at the input shape the model feeds it** (``faulty_convolutions``): one that
   cannot be trusted computes in fp32 from then on (``run_in_fp32``), the rest of the model in bf16. torch 2.13's
   oneDNN bf16 convolution backward on CPUs returns weight gradients that are NaN or many orders of magnitude
   off, at random, wherever an input or output extent is smaller than the kernel (the last stages of a ResNet at
   4 mm: depth 2 under a 3³ kernel), and writes outside its buffers there: those are moved without being run
   (``below_kernel``). Every other convolution's forward, input and weight gradient are checked on random data.
   The reproduction for PyTorch is in docs/precision.md.
2. **The model's own bf16 forward and backward** (``self_check``): the loss and every weight's gradient, finite
   and close to fp32. ``precision: auto`` picks bf16 only after it passes.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from common.precision import choose_precision, resolve_precision

log = logging.getLogger(__name__)

CONV_TOLERANCE = (
    0.05  # relative L2 error of a bf16 convolution vs fp32 on the same bf16 values; a sound kernel's is < 0.01
)
LOSS_TOLERANCE = 0.05  # relative difference of the bf16 loss from the fp32 loss (bf16 keeps 3 significant digits)
GRAD_COSINE = 0.8  # cosine of the whole bf16 gradient with fp32's; measured: 0.92-1.0 sound kernels, 0.0-0.85 faulty
WEIGHT_COSINE = 0.5  # the same for each weight (2-D and up); measured: sound 0.71-1.0 (LoRA's B at 0.71), faulty 0-0.53
KERNEL_TRIALS = 3  # the faulty kernel reads memory it did not write: one clean trial proves little


class _Fp32Forward:
    """A convolution that computes in fp32 even inside a bf16 autocast region (its bf16 kernel failed the check)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class Fp32Conv1d(_Fp32Forward, nn.Conv1d):
    pass


class Fp32Conv2d(_Fp32Forward, nn.Conv2d):
    pass


class Fp32Conv3d(_Fp32Forward, nn.Conv3d):
    pass


FP32_CONV = {nn.Conv1d: Fp32Conv1d, nn.Conv2d: Fp32Conv2d, nn.Conv3d: Fp32Conv3d}


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Leave ``model``'s buffers (BatchNorm statistics), gradients and the RNG as they were: a check must not
    count a batch in the statistics, leave gradients behind or shift the random stream the run then draws."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if cuda else None)
    try:
        yield
    finally:
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        model.zero_grad(set_to_none=True)


def conv_inputs(model: nn.Module, forward: Callable[[nn.Module], object]) -> dict[str, tuple[nn.Module, torch.Size]]:
    """The convolutions ``forward(model)`` runs and the input shape each sees: name -> (module, shape)."""
    seen: dict[str, tuple[nn.Module, torch.Size]] = {}

    def record(name: str, module: nn.Module, args: tuple) -> None:  # a pre-hook returning a value replaces args
        seen.setdefault(name, (module, args[0].shape))

    hooks = [
        m.register_forward_pre_hook(lambda m, args, name=name: record(name, m, args))
        for name, m in model.named_modules()
        if type(m) in FP32_CONV
    ]
    try:
        with preserved(model), torch.no_grad():
            forward(model)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _conv_pass(conv: nn.Module, x: torch.Tensor, w: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Output, input gradient and weight gradient of ``conv``'s operation (its stride, padding, groups) on
    ``x`` and ``w``, in their dtype."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    with torch.autocast(x.device.type, enabled=False):
        y = conv._conv_forward(x, w, None)
    return [y, *torch.autograd.grad(y, (x, w), grad_out.to(y.dtype))]


def kernel_error(conv: nn.Module, shape: torch.Size, trials: int = KERNEL_TRIALS) -> float:
    """Worst relative L2 error of ``conv``'s bf16 forward, input and weight gradient against fp32 on the same
    bf16-rounded values, over ``trials`` random inputs of ``shape`` (inf if anything is not finite)."""
    device = conv.weight.device
    rng = torch.Generator(device).manual_seed(0)  # its own stream: the run's random draws stay as they were
    w = conv.weight.detach().to(torch.bfloat16)
    worst = 0.0
    for _ in range(trials):
        x = torch.randn(shape, device=device, generator=rng).relu_().to(torch.bfloat16)  # as after a norm + ReLU
        with torch.no_grad():
            out_shape = conv._conv_forward(x[:1].float(), w.float(), None).shape[1:]
        grad_out = torch.randn(shape[0], *out_shape, device=device, generator=rng).to(torch.bfloat16)
        ours = _conv_pass(conv, x, w, grad_out)
        reference = _conv_pass(conv, x.float(), w.float(), grad_out.float())
        for a, r in zip(ours, reference):
            if not torch.isfinite(a).all():
                return float("inf")
            worst = max(worst, float((a.detach().float() - r.detach()).norm() / r.detach().norm().clamp_min(1e-30)))
    return worst


def below_kernel(conv: nn.Module, shape: torch.Size) -> bool:
    """Whether some spatial extent of ``conv``'s input (``shape``) or output is smaller than its (dilated) kernel:
    where oneDNN's bf16 weight gradient fails on CPUs (torch 2.13, docs/precision.md). There it also writes
    outside its buffers (glibc aborted a process with "munmap_chunk(): invalid pointer"), so it is not run
    even to check it; 3 896 random geometries outside this region were all sound."""
    spatial = shape[2:]
    for i, extent in enumerate(spatial):
        kernel = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        padding = conv.padding[i] if not isinstance(conv.padding, str) else (kernel - 1) // 2 * (conv.padding == "same")
        out = (extent + 2 * padding - kernel) // conv.stride[i] + 1
        if kernel > 1 and (extent < kernel or out < kernel):
            return True
    return False


_VERDICTS: dict[tuple, str | None] = {}  # this process's kernel verdicts: a fine-tuning grid checks each fold


def faulty_convolutions(model: nn.Module, forward: Callable[[nn.Module], object]) -> dict[str, str]:
    """The convolutions ``forward(model)`` runs whose bf16 kernels cannot be trusted at the input shape each
    sees: on a CPU, those ``below_kernel``; anywhere, those whose check (``kernel_error``) is off by more than
    ``CONV_TOLERANCE``. Returns name -> a note with the shape and why."""
    faulty = {}
    verdicts = _VERDICTS  # convolutions of the same geometry share one verdict, also across folds and runs
    for name, (conv, shape) in conv_inputs(model, forward).items():
        geometry = (tuple(shape), tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation, conv.groups)
        geometry += (str(conv.weight.device),)
        if geometry not in verdicts:
            verdicts[geometry] = None
            if conv.weight.device.type == "cpu" and below_kernel(conv, shape):
                verdicts[geometry] = "extent below the kernel: oneDNN's bf16 weight gradient fails there"
            elif (error := kernel_error(conv, shape)) > CONV_TOLERANCE:
                verdicts[geometry] = f"bf16 error {error:.3g}"
        if verdicts[geometry] is not None:
            faulty[name] = f"{name} (input {tuple(shape)}, {verdicts[geometry]})"
    return faulty


def run_in_fp32(model: nn.Module, names) -> None:
    """The convolutions ``names`` of ``model`` compute in fp32 from now on, inside bf16 autocast too (same
    parameters, state-dict keys and class for ``isinstance``)."""
    modules = dict(model.named_modules())
    for name in names:
        conv = modules[name]
        conv.__class__ = FP32_CONV.get(type(conv), type(conv))


def _loss_and_grads(
    model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], device: torch.device, bf16: bool
) -> tuple[float, dict[str, torch.Tensor]]:
    with preserved(model):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model)
        loss.float().backward()
        # the gradients themselves, in their dtype: ``preserved`` unsets them on the model, nothing writes them
        grads = {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach().float()), grads


def _dot_and_squares(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """a·b, a·a and b·b in float64."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    return float(a @ b), float(a @ a), float(b @ b)


def _cosine(ab: float, aa: float, bb: float) -> float:
    return ab / max(math.sqrt(aa) * math.sqrt(bb), 1e-30)  # 0 where either vector is 0


def gradient_cosines(
    grads16: dict[str, torch.Tensor], grads32: dict[str, torch.Tensor]
) -> tuple[float, dict[str, float]]:
    """The cosine of the whole bf16 gradient with fp32's, and of each weight's (2-D and up, fp32 gradient not 0).
    Summed from per-tensor dot products and squares in float64, one tensor at a time: concatenating every
    gradient into flat vectors would copy the whole model twice at start-up."""
    sums = {n: _dot_and_squares(grads16[n], g) for n, g in grads32.items()}
    total = _cosine(*(math.fsum(s[i] for s in sums.values()) for i in range(3)))
    weights = {n: _cosine(*sums[n]) for n, g in grads32.items() if g.ndim >= 2 and sums[n][2] > 0}
    return total, weights


def self_check(
    model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], device: str | torch.device
) -> tuple[bool, str]:
    """Whether ``model`` trains in bf16 on ``device``: ``loss_fn(model)`` (a scalar loss of one batch) and its
    gradients under bf16 autocast against fp32, with the same batch, random draws and buffers. Returns
    (passed, a sentence for the log). The model is left as it was.

    Gradients are compared by direction: at initialisation bf16's own rounding moves a contrastive loss's
    gradient by 20-40 % (the same with PyTorch's reference kernels), while a faulty kernel's is NaN or points
    anywhere. Only weights (2-D and up) are judged one by one: a bias or norm whose true gradient is ~0 (a shift
    the next BatchNorm removes) has no direction to keep.
    """
    device = torch.device(device)
    loss32, grads32 = _loss_and_grads(model, loss_fn, device, bf16=False)
    loss16, grads16 = _loss_and_grads(model, loss_fn, device, bf16=True)
    bad = next((n for n, g in grads16.items() if not torch.isfinite(g).all()), None)
    if bad is not None or not math.isfinite(loss16):
        return False, f"bf16 gives a non-finite value in {bad or 'the loss'}"
    if set(grads16) != set(grads32):
        return False, "bf16 leaves different parameters without a gradient than fp32"
    loss_err = abs(loss16 - loss32) / max(abs(loss32), 1e-6)
    total, weights = gradient_cosines(grads16, grads32)
    worst = min(weights, key=weights.get, default=None)
    summary = f"loss {loss16:.4g} vs {loss32:.4g} in fp32 ({loss_err:.1%} off), gradient cosine {total:.3f}" + (
        f" (lowest {worst}: {weights[worst]:.3f})" if worst else ""
    )
    passed = loss_err <= LOSS_TOLERANCE and total >= GRAD_COSINE and (worst is None or weights[worst] >= WEIGHT_COSINE)
    return passed, summary


def train_precision(
    requested: str,
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    device: str | torch.device,
    key: str = "train.precision",
    timings: Callable[[], dict[str, float]] | None = None,
    gather: Callable[[object], list] = lambda value: [value],
) -> tuple[str, str]:
    """The precision a training run of ``model`` computes in, and why (a sentence for the log).

    ``requested`` is the config's word (``auto | bf16 | fp32``, ``key`` names it in errors). Wherever the run
    would compute in bf16, the convolutions whose bf16 kernels fail their check are moved to fp32 first
    (``faulty_convolutions``, ``run_in_fp32``). ``auto`` then keeps bf16 only if ``self_check`` passes and,
    given ``timings``, bf16 is not slower (``common.precision.choose_precision``); an explicit ``bf16`` is
    honoured, with a warning if the check fails. ``gather`` collects a value from every rank (e.g.
    ``all_gather_object``) so that all decide alike: the faulty convolutions of any rank, the check passed on all.
    """
    device = torch.device(device)
    if resolve_precision(requested, device, key) == "fp32":
        return "fp32", "fp32 as asked" if requested == "fp32" else choose_precision(device)[1]
    faulty = {k: v for found in gather(faulty_convolutions(model, loss_fn)) for k, v in found.items()}
    run_in_fp32(model, faulty)
    moved = (
        f"; {len(faulty)} convolution(s) whose bf16 kernel failed its check compute in fp32: "
        + ", ".join(faulty.values())
        if faulty
        else ""
    )

    def check() -> tuple[bool, str]:
        passed, detail = self_check(model, loss_fn, device)
        return all(gather(passed)), detail

    if requested == "auto":
        chosen, why = choose_precision(device, timings, check)
        return chosen, why + moved
    passed, detail = check()
    if not passed:
        log.warning("%s=bf16 as asked, but this model's bf16 step fails the check against fp32: %s", key, detail)
    return "bf16", f"bf16 as asked ({'passes' if passed else 'FAILS'} the check against fp32: {detail})" + moved
