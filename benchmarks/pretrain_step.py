"""One MAE training step: our ViT-B/16 MAE against MONAI's ``MaskedAutoEncoderViT`` at the same dimensions.

    python benchmarks/pretrain_step.py [--steps 5] [--batch 4] [--size 96]

Both models: encoder 768 wide × 12 blocks (MLP 3072, qkv bias), decoder 384 × 4 (MLP 1536), 16³ patches, mask
ratio 0.75, batch 4 of 96³ volumes; a step is forward + masked-patch MSE + backward + AdamW. Printed:
- throughput (volumes/s) of each, timed in this process, alternating the two models round by round, in fp32
  and in bf16 (``torch.autocast``), and the ratio ours / MONAI;
- peak memory: each (model, precision) runs in a fresh child process and reports its peak resident set size
  (``VmHWM``, kernel-tracked) minus its RSS after imports, so weights, gradients, AdamW state and
  activations count and allocator reuse between models cannot hide anything;
- the share of this CPU's measured matmul peak (fp32 and bf16 4096² GEMMs) that our step reaches, from its
  FLOPs counted by ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MASK_RATIO = 0.75


def build(which: str, size: int) -> torch.nn.Module:
    if which == "ours":
        from common.models import create_backbone
        from pretrain.objectives.mae import MaskedAutoencoder

        encoder = create_backbone("vit_base_p16", img_size=size, attn_backend="sdpa")
        return MaskedAutoencoder(
            encoder,
            MASK_RATIO,
            "random",
            norm_pix_loss=False,
            decoder_dim=384,
            decoder_depth=4,
            decoder_heads=12,
        )
    from monai.networks.nets import MaskedAutoEncoderViT

    return MaskedAutoEncoderViT(
        in_channels=1,
        img_size=size,
        patch_size=16,
        hidden_size=768,
        mlp_dim=3072,
        num_layers=12,
        num_heads=12,
        masking_ratio=MASK_RATIO,
        decoder_hidden_size=384,
        decoder_mlp_dim=1536,
        decoder_num_layers=4,
        decoder_num_heads=12,
        qkv_bias=True,
    )


def patchify(x: torch.Tensor, p: int = 16) -> torch.Tensor:
    """(B, 1, D, H, W) -> (B, N, p³): MONAI's target, in its raster token order."""
    B, _, D, H, W = x.shape
    x = x.reshape(B, D // p, p, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(B, -1, p**3)


def make_step(which: str, model: torch.nn.Module, bf16: bool):
    """bf16: ours under ``torch.autocast`` (fp32 weights); MONAI's model fails under autocast (its decoder's
    index_put mixes fp32 mask tokens with bf16 activations), so it runs with bf16 weights and inputs instead."""
    monai_bf16 = bf16 and which == "monai"
    if monai_bf16:
        model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step(x: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and not monai_bf16):
            if which == "ours":
                loss = model({"image": x})["loss"]
            else:
                pred, mask = model(x.to(torch.bfloat16) if monai_bf16 else x)  # (B, N, p³), (B, N) 1 = masked
                loss = (((pred.float() - patchify(x)) ** 2).mean(-1) * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def proc_status_gb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc, in GiB. VmHWM belongs to the process's
    own address space, unlike ``ru_maxrss``, which a spawned child inherits from its parent across exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _memory_child(which: str, size: int, batch: int, bf16: bool, queue) -> None:
    torch.manual_seed(0)
    base = proc_status_gb("VmRSS")
    model = build(which, size)
    step = make_step(which, model, bf16)
    x = torch.rand(batch, 1, size, size, size)
    for _ in range(2):  # the second step has AdamW state allocated: the steady-state peak
        step(x)
    queue.put(proc_status_gb("VmHWM") - base)


def peak_memory_gb(which: str, size: int, batch: int, bf16: bool) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(which, size, batch, bf16, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def matmul_peak_gflops(dtype: torch.dtype, n: int = 4096, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def step_flops(model, which, size, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    step = make_step(which, model, bf16=False)
    with FlopCounterMode(display=False) as counter:
        step(torch.rand(batch, 1, size, size, size))
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and precision")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, args.size, args.size, args.size)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} × {args.size}³, "
        f"mask {MASK_RATIO}"
    )

    peak = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    print(
        f"matmul peak (4096² GEMM): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s",
        flush=True,
    )
    models = {w: build(w, args.size) for w in ("ours", "monai")}
    params = {w: sum(p.numel() for p in m.parameters()) / 1e6 for w, m in models.items()}
    print(f"parameters: ours {params['ours']:.1f} M, MONAI {params['monai']:.1f} M")
    flops = step_flops(models["ours"], "ours", args.size, args.batch)

    for precision in ("fp32", "bf16"):
        steps = {w: make_step(w, m, precision == "bf16") for w, m in models.items()}
        for w in steps:  # warm-up: allocator, AdamW state, oneDNN kernels
            steps[w](x)
        elapsed = {"ours": 0.0, "monai": 0.0}
        for _ in range(args.steps):  # alternate, so load from other processes hits both alike
            for w in ("ours", "monai"):
                start = time.perf_counter()
                steps[w](x)
                elapsed[w] += time.perf_counter() - start
        vps = {w: args.batch * args.steps / t for w, t in elapsed.items()}
        mem = {w: peak_memory_gb(w, args.size, args.batch, precision == "bf16") for w in models}
        share = flops / (elapsed["ours"] / args.steps) / 1e9 / peak[precision]
        print(
            f"{precision}: ours {vps['ours']:.2f} vol/s, MONAI {vps['monai']:.2f} vol/s -> throughput ratio "
            f"{vps['ours'] / vps['monai']:.2f}x | peak memory ours {mem['ours']:.2f} GiB, MONAI "
            f"{mem['monai']:.2f} GiB -> ratio {mem['ours'] / mem['monai']:.2f} | our step: "
            f"{flops / 1e9:.0f} GFLOP, {share:.0%} of the {precision} matmul peak",
            flush=True,
        )


if __name__ == "__main__":
    main()
