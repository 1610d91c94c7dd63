"""What the bf16 convolution guard costs: one SimCLR micro-step (forward + backward) of the quickstart's CNN
(ResNet-18 ×0.5 at 40 × 48 × 40, two views of ``--batch``) in each way of running it, as a ratio to fp32.

- ``fp32``: the baseline.
- ``bf16 guarded``: what a run does (``common.bf16_check``: the convolutions below their kernel in fp32).
- ``bf16 unguarded``: oneDNN's faulty kernel left in (timing only: its gradients are garbage).
- ``bf16 oneDNN off``: ``torch.backends.mkldnn`` disabled for the whole step (PyTorch's own kernels).
- ``bf16 convs fp32``: every convolution in fp32, the rest in bf16.

Steps alternate between the ways, so load from other processes hits all alike; the fastest of ``--rounds``
counts. The last line is one JSON object.

    python benchmarks/bf16_guard.py [--batch 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time

import torch

from common.bf16_check import faulty_convolutions, run_in_fp32
from common.models import create_backbone
from common.precision import bf16_native
from pretrain.objectives import SimCLR

SIZE = (40, 48, 40)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base = SimCLR(create_backbone("resnet18", img_size=SIZE, widen_factor=0.5), 512, 128, 0.1, 0).train()
    batch = {k: torch.rand(args.batch, 1, *SIZE) for k in ("view1", "view2")}
    loss = lambda m: m(batch)["loss"]

    guarded = copy.deepcopy(base)
    moved = faulty_convolutions(guarded, loss)
    run_in_fp32(guarded, moved)
    all_fp32 = copy.deepcopy(base)
    run_in_fp32(all_fp32, [n for n, m in all_fp32.named_modules() if isinstance(m, torch.nn.Conv3d)])
    no_onednn = lambda: torch.backends.mkldnn.flags(enabled=False)
    ways = {  # name -> (model, precision, context)
        "fp32": (base, "fp32", contextlib.nullcontext),
        "bf16 guarded": (guarded, "bf16", contextlib.nullcontext),
        "bf16 unguarded": (base, "bf16", contextlib.nullcontext),
        "bf16 oneDNN off": (base, "bf16", no_onednn),
        "bf16 convs fp32": (all_fp32, "bf16", contextlib.nullcontext),
    }

    def step(model, precision, context) -> None:
        with context(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = loss(model)
        with context():
            out.float().backward()
        model.zero_grad(set_to_none=True)

    best = {name: float("inf") for name in ways}
    for way in ways.values():  # warm-up: allocator, oneDNN primitives
        step(*way)
    for _ in range(args.rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            step(*way)
            best[name] = min(best[name], time.perf_counter() - start)
    native = bf16_native("cpu")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {native}; SimCLR ResNet-18 x0.5 "
        f"at {SIZE}, batch {args.batch} x 2 views; guard moved {len(moved)} convolution(s): {', '.join(moved)}"
    )
    for name, seconds in best.items():
        print(f"{name:16s} {seconds * 1e3:8.1f} ms  {seconds / best['fp32']:.2f}x fp32's time")
    summary = {
        "native_bf16": native,
        "batch": args.batch,
        "moved": len(moved),
        "seconds": {k: round(v, 4) for k, v in best.items()},
        "vs_fp32": {k: round(v / best["fp32"], 3) for k, v in best.items()},
        "guarded_vs_unguarded": round(best["bf16 guarded"] / best["bf16 unguarded"], 3),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
