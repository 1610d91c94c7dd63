"""Attention backends against the reference: time and peak memory of forward + backward, sdpa vs math.

Shapes are ViT-B's (12 heads x 64) at the token counts of 3D volumes: 55 (the quarter of 96³ / 16³ an MAE
encoder sees), 216 (96³ / 16³), 512 (128³ / 16³), 1728 (96³ / 8³ or 192³ / 16³) and 4096 (256³ / 16³), in
float32 and bfloat16. Every number is measured in this
one process, and each backend is printed as a ratio to ``math`` (the baseline) measured right before it, with
the backend ``auto`` picks for that shape (``common.attention.resolve_backend``).

How it is measured:
- time: median wall time of forward+backward steps (``out.sum().backward()`` on q, k, v that require
  grad) after ``warmup`` steps, the backends taking turns step by step (at least ``repeats`` rounds, more
  for fast steps) so that load from other processes on a shared machine falls on both alike;
  ``torch.cuda.synchronize`` around each step on GPU.
- peak memory on CPU: one extra step under ``torch.profiler`` with ``profile_memory=True``; its allocation
  events (every allocation and free made through PyTorch's CPU allocator, with a timestamp) are replayed in
  time order and the peak of live bytes is taken, relative to the start of the step. It counts tensor memory
  only, not the process RSS (which is noisy) nor a kernel's scratch buffers outside the allocator.
- peak memory on CUDA: ``torch.cuda.max_memory_allocated`` over one step, minus what was allocated before.

Run: ``python -m benchmarks.attention`` (about two minutes on 2 CPU cores); ``--device cuda`` on a GPU, where
xformers is added when installed. Options: ``--tokens``, ``--batch``, ``--repeats``, ``--warmup``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from common.attention import resolve_backend, scaled_dot_product, xformers_available

HEADS, HEAD_DIM = 12, 64  # ViT-B
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_step(backend: str, batch: int, tokens: int, dtype: torch.dtype, device: torch.device):
    """A forward+backward closure over fresh q, k, v of shape (batch, 12, tokens, 64)."""
    q, k, v = (
        torch.randn(batch, HEADS, tokens, HEAD_DIM, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
    )

    def step() -> None:
        scaled_dot_product(q, k, v, backend=backend).sum().backward()
        for t in (q, k, v):  # freed inside the step, so a profiled step sees no frees of older blocks
            t.grad = None

    return step


def interleaved_seconds(steps: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per step for each backend, the backends taking turns so that load from other processes
    falls on all of them alike. Fast steps get more rounds (up to 50, about 1 s per backend)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(step) -> float:
        sync()
        start = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - start

    for step in steps.values():
        for _ in range(warmup):
            step()
    first = {name: timed(step) for name, step in steps.items()}
    rounds = max(repeats, min(50, int(1.0 / max(first.values()))))
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(timed(step))
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_peak_bytes(step) -> int:
    """Peak live tensor bytes during one ``step``, replayed from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == torch._C._profiler._EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))  # negative size = free
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        live += size
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(step, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[55, 216, 512, 1728, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = ["sdpa"] + (["xformers"] if device.type == "cuda" and xformers_available() else [])

    print(
        f"attention fwd+bwd, batch {args.batch} x {HEADS} heads x {HEAD_DIM}, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of >= {args.repeats} "
        f"interleaved rounds after {args.warmup} warm-up; ratio = backend / math (lower is better)"
    )
    print(
        f"{'tokens':>6} {'dtype':>5} {'backend':>8} {'math ms':>9} {'ms':>9} {'time ratio':>10} "
        f"{'math MiB':>9} {'MiB':>8} {'mem ratio':>9} {'auto':>8}"
    )
    for tokens in args.tokens:
        for dtype_name, dtype in DTYPES.items():
            steps = {b: make_step(b, args.batch, tokens, dtype, device) for b in ["math", *backends]}
            seconds = interleaved_seconds(steps, device, args.warmup, args.repeats)
            peak = {
                b: cuda_peak_bytes(s, device) if device.type == "cuda" else cpu_peak_bytes(s) for b, s in steps.items()
            }
            del steps
            base_s, base_mem = seconds["math"], peak["math"]
            for backend in backends:
                s, mem = seconds[backend], peak[backend]
                print(
                    f"{tokens:>6} {dtype_name:>5} {backend:>8} {base_s * 1e3:>9.1f} {s * 1e3:>9.1f} "
                    f"{s / base_s:>10.3f} {base_mem / 2**20:>9.1f} {mem / 2**20:>8.1f} {mem / base_mem:>9.3f} "
                    f"{resolve_backend('auto', device, dtype, tokens):>8}"
                )


if __name__ == "__main__":
    main()
