"""One pre-training step as ``python -m pretrain`` runs it, against MONAI's model trained the way its users would.

    python benchmarks/pretrain_step.py [--steps 3] [--batch 4] [--size 96] [--precisions fp32,bf16] [--cnn]

MAE (always): ours is ``configs/pretrain/synthmri_mae.yaml`` (ViT-B/16 at 96³, mask 0.75, decoder 384 × 4,
norm-pix loss, AdamW β = (0.9, 0.95), clipping 1.0) at batch ``--batch`` and one micro-batch per step, stepped
through ``pretrain.engine.Engine`` (DeepSpeed, our optimizer settings and precision handling) exactly as
``pretrain.trainer`` does: forward, the finite-loss check, backward, step. MONAI's ``MaskedAutoEncoderViT`` at
the same dimensions (768 × 12, MLP 3072, qkv bias; decoder 384 × 4, MLP 1536) with ``torch.optim.AdamW``'s
defaults and a masked-patch MSE; in bf16 with bf16 weights, as its model fails under ``torch.autocast`` (its
decoder's ``index_put`` mixes fp32 mask tokens with bf16 activations).

SimCLR (``--cnn``): ours is ``configs/pretrain/synthmri_simclr.yaml`` with a ResNet-18 through the engine; the
baseline the same objective (a copy with the same initial weights) in a plain PyTorch loop (forward, backward,
``torch.optim.AdamW`` defaults), at ``--cnn-size``³ (default 48: a ResNet-18 step at 96³ takes minutes on 2 cores).

Printed per precision: volumes/s of each, timed in this process, alternating the two round by round (load from
other processes hits both alike), and the ratio; peak memory, each (model, precision) in a fresh child process
(``VmHWM`` minus the RSS after imports: weights, gradients, optimizer state and activations); each step's FLOPs
(``torch.utils.flop_counter``) as a share of this machine's matmul peak of that precision (the better of a 2048²
and a 3072² GEMM, measured in every timed round and averaged like the steps: these machines change speed over
minutes, so a peak from another moment would skew the share either way); the ratio a step doing our FLOPs would
reach at 100 % of that peak; and, from one profiled step of each, the share of the step spent in matrix products,
attention and convolutions, and the ratio our step would reach if nothing else in it took time (its products at
the speed they ran): the ceiling for anything but faster kernels.
Then what ``precision: auto`` picks here (``pretrain.engine.train_precision``, which checks and times a step where
bf16 is native) and our throughput at it over MONAI's at its faster precision. The last line is one JSON object
with all of it.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MASK_RATIO = 0.75
ENV_OF_A_WORLD = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_PORT")


# ---- our side: the recipe through the engine -----------------------------------------------------------------
def recipe(task: str, size: int, batch: int):
    from common.config import load_config
    from pretrain.config import PretrainConfig

    name, extra = ("synthmri_mae", []) if task == "mae" else ("synthmri_simclr", ["model.backbone=resnet18"])
    overrides = [
        f"data.input_size=[{size},{size},{size}]",
        f"data.batch_size={batch}",
        "optim.accumulation_steps=1",
        "optim.warmup_steps=1",
        "train.steps=100000",
        *extra,
    ]
    return load_config(PretrainConfig, REPO / f"configs/pretrain/{name}.yaml", overrides)


def build_objective(cfg) -> torch.nn.Module:
    from common.models import create_backbone
    from pretrain.objectives import build_objective as build

    kwargs = dict(cfg.model.kwargs)
    encoder = create_backbone(cfg.model.backbone, img_size=tuple(cfg.data.input_size), **kwargs)
    if hasattr(encoder, "attn_backend"):
        encoder.attn_backend = cfg.model.attn_backend
    return build(cfg.objective, encoder)


def example_batch(task: str, size: int, batch: int) -> dict[str, torch.Tensor]:
    keys = ("image",) if task == "mae" else ("view1", "view2")
    return {k: torch.rand(batch, 1, size, size, size) for k in keys}


def engine_step(cfg, objective: torch.nn.Module, precision: str, example: dict[str, torch.Tensor]):
    """The trainer's micro-step on an engine built as ``pretrain.cli`` builds it (in bf16: after
    ``pretrain.engine.train_precision``'s checks on ``example``, which move faulty convolutions to fp32)."""
    from pretrain.engine import Engine, build_ds_config, train_precision

    if precision == "bf16":
        train_precision(objective, example, "bf16")
    engine = Engine(objective, build_ds_config(cfg, None, 1, precision))

    def step(batch: dict[str, torch.Tensor]) -> None:
        out = engine(batch)
        if not engine.all_finite(out["loss"]):
            raise RuntimeError("non-finite loss in the benchmark")
        engine.backward(out["loss"])
        engine.step()

    return step


# ---- the baselines -----------------------------------------------------------------------------------------
def monai_mae(size: int) -> torch.nn.Module:
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


def monai_loss(pred: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """MSE over the masked patches: MONAI's ``(pred, mask)`` against the patches of ``x``."""
    return (((pred.float() - patchify(x)) ** 2).mean(-1) * mask).sum() / mask.sum()


def plain_step(task: str, model: torch.nn.Module, precision: str):
    """A user's loop: ``torch.optim.AdamW`` defaults; MAE in bf16 with bf16 weights (autocast fails on MONAI's
    model); SimCLR in bf16 under autocast (fp32 weights)."""
    bf16_weights = precision == "bf16" and task == "mae"
    if bf16_weights:
        model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    autocast = precision == "bf16" and not bf16_weights

    def step(batch: dict[str, torch.Tensor]) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if task == "mae":
                x = batch["image"]
                pred, mask = model(x.to(torch.bfloat16) if bf16_weights else x)  # (B, N, p³), (B, N) 1 = masked
                loss = monai_loss(pred, mask, x)
            else:
                loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def build_steps(task: str, size: int, batch: int, precision: str, which=("ours", "base")) -> dict:
    """{"ours": step, "base": step} (or those in ``which``) for one precision, with freshly built models; the
    SimCLR baseline starts from our initial weights."""
    cfg = recipe(task, size, batch)
    steps = {}
    if "ours" in which or task != "mae":
        torch.manual_seed(0)
        ours = build_objective(cfg)
    if "base" in which:
        steps["base"] = plain_step(task, monai_mae(size) if task == "mae" else copy.deepcopy(ours), precision)
    if "ours" in which:
        steps["ours"] = engine_step(cfg, ours, precision, example_batch(task, size, batch))
    return steps


# ---- measurements --------------------------------------------------------------------------------------------
def proc_status_gb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in GiB. VmHWM belongs to the process's own address
    space, unlike ``ru_maxrss``, which a spawned child inherits from its parent across exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _memory_child(task: str, which: str, size: int, batch: int, precision: str, queue) -> None:
    for key in ENV_OF_A_WORLD:  # a world of one of its own (the parent's port is taken)
        os.environ.pop(key, None)
    from pretrain.engine import init_distributed

    init_distributed()
    base = proc_status_gb("VmRSS")
    step = build_steps(task, size, batch, precision, (which,))[which]
    x = example_batch(task, size, batch)
    for _ in range(2):  # the second step has the optimizer state allocated: the steady-state peak
        step(x)
    queue.put(proc_status_gb("VmHWM") - base)


def peak_memory_gb(task: str, which: str, size: int, batch: int, precision: str) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(task, which, size, batch, precision, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def matmul_peak_gflops(dtype: torch.dtype, sizes=(2048, 3072), reps: int = 3) -> float:
    """The best GEMM rate of a few square sizes now: the machine's attainable matmul rate for ``dtype``."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def forward_backward_flops(task: str, size: int, batch: int, which: str = "ours") -> int:
    """Matmul/conv FLOPs of one forward + backward (fp32) on one batch: our objective, or (``which="base"``, MAE)
    MONAI's with the baseline's loss."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    x = example_batch(task, size, batch)
    with FlopCounterMode(display=False) as counter:
        if which == "base":
            loss = monai_loss(*monai_mae(size)(x["image"]), x["image"])
        else:
            loss = build_objective(recipe(task, size, batch))(x)["loss"]
        loss.backward()
    return counter.get_total_flops()


# the kernels that do a step's counted FLOPs: matrix products, attention and convolutions
PRODUCT_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
}


def product_seconds(step, x: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(seconds in ``PRODUCT_OPS``, seconds in all ops) of one profiled step: what the step would take if
    everything but its matrix products, attention and convolutions took no time, and what it took."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = sum(e.self_cpu_time_total for e in events if e.key in PRODUCT_OPS)
    return products / 1e6, total / 1e6


def compare(task: str, size: int, batch: int, steps: int, precisions, peak: dict[str, list[float]]) -> dict:
    """Throughput, memory and FLOP share of ours vs the baseline, per precision, plus ``auto``. ``peak`` (GFLOP/s
    per precision) gets one sample per timed round, kept across calls."""
    from pretrain.engine import train_precision

    flops = {"ours": forward_backward_flops(task, size, batch)}
    flops["base"] = forward_backward_flops(task, size, batch, "base") if task == "mae" else flops["ours"]
    x = example_batch(task, size, batch)
    results = {}
    base_name, key = ("MONAI", "monai") if task == "mae" else ("plain loop", "plain")
    for precision in precisions:
        pair = build_steps(task, size, batch, precision)
        for w in pair:  # warm-up: allocator, optimizer state, oneDNN kernels
            pair[w](x)
        elapsed = {"ours": 0.0, "base": 0.0}
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        for _ in range(steps):  # alternate, so load from other processes hits both alike (the peak too)
            peak.setdefault(precision, []).append(matmul_peak_gflops(dtype))
            for w in ("ours", "base"):
                start = time.perf_counter()
                pair[w](x)
                elapsed[w] += time.perf_counter() - start
        products = {w: product_seconds(pair[w], x) for w in pair}
        del pair
        vps = {w: batch * steps / t for w, t in elapsed.items()}
        mem = {w: peak_memory_gb(task, w, size, batch, precision) for w in ("ours", "base")}
        rate = statistics.mean(peak[precision])  # GFLOP/s, over this and earlier rounds
        share = {w: flops[w] / (elapsed[w] / steps) / 1e9 / rate for w in elapsed}
        # the most any step doing our FLOPs could reach here: all of them at the measured matmul peak
        ceiling = rate * 1e9 * (elapsed["base"] / steps) / flops["ours"]
        # ... and if only its products took time, at the speed they ran in it (the ratio of profiled times)
        product_ceiling = products["base"][1] / products["ours"][0]
        product_share = {w: products[w][0] / products[w][1] for w in products}
        results[precision] = {
            "ours_vol_s": round(vps["ours"], 3),
            f"{key}_vol_s": round(vps["base"], 3),
            "ratio": round(vps["ours"] / vps["base"], 3),
            "ours_peak_gib": round(mem["ours"], 3),
            f"{key}_peak_gib": round(mem["base"], 3),
            "memory_ratio": round(mem["ours"] / mem["base"], 3),
            "gflop_per_step": round(flops["ours"] / 1e9, 1),
            f"{key}_gflop_per_step": round(flops["base"] / 1e9, 1),
            "share_of_peak": round(share["ours"], 3),
            f"{key}_share_of_peak": round(share["base"], 3),
            "ratio_ceiling_at_peak": round(ceiling, 3),
            "products_share_of_step": round(product_share["ours"], 3),
            f"{key}_products_share_of_step": round(product_share["base"], 3),
            "ratio_ceiling_products_only": round(product_ceiling, 3),
        }
        print(
            f"{task} {precision}: ours {vps['ours']:.2f} vol/s, {base_name} {vps['base']:.2f} vol/s -> "
            f"throughput ratio {vps['ours'] / vps['base']:.2f}x | peak memory ours {mem['ours']:.2f} GiB, "
            f"{base_name} {mem['base']:.2f} GiB -> ratio {mem['ours'] / mem['base']:.2f} | our step: "
            f"{flops['ours'] / 1e9:.0f} GFLOP, {share['ours']:.0%} of the {precision} matmul peak "
            f"({rate:.0f} GFLOP/s); {base_name}'s: {flops['base'] / 1e9:.0f} GFLOP, "
            f"{share['base']:.0%} | ceiling: our FLOPs at 100% of the peak would be {ceiling:.2f}x {base_name}\n"
            f"  profiled step: matrix products, attention and convolutions are {product_share['ours']:.0%} of ours, "
            f"{product_share['base']:.0%} of {base_name}'s; ours with nothing else would be "
            f"{product_ceiling:.2f}x {base_name}",
            flush=True,
        )
    torch.manual_seed(0)
    auto, why = train_precision(build_objective(recipe(task, size, batch)), x, "auto")
    print(f"{task}: precision auto -> {auto} ({why})", flush=True)
    summary = {"auto_precision": auto, "reason": why, **results}
    if auto in results:
        best = max(r[f"{key}_vol_s"] for r in results.values())
        summary[f"ratio_auto_vs_{key}_best"] = round(results[auto]["ours_vol_s"] / best, 3)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and precision")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--cnn", action="store_true", help="also SimCLR with a ResNet-18 vs a plain loop")
    parser.add_argument("--cnn-size", type=int, default=48)
    parser.add_argument("--cnn-batch", type=int, default=4)
    args = parser.parse_args()
    precisions = [p for p in args.precisions.split(",") if p]
    if not set(precisions) <= {"fp32", "bf16"}:
        parser.error(f"--precisions takes fp32 and/or bf16, got {args.precisions!r}")

    from common.precision import bf16_native
    from pretrain.engine import init_distributed

    init_distributed()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {bf16_native('cpu')}, "
        f"load average {os.getloadavg()[0]:.1f}; MAE batch {args.batch} × {args.size}³, mask {MASK_RATIO}",
        flush=True,
    )
    peak: dict[str, list[float]] = {}  # per precision, the GEMM rate of every timed round
    mae = compare("mae", args.size, args.batch, args.steps, precisions, peak)
    out = {
        "auto_precision": mae["auto_precision"],
        "ratio_auto_vs_monai_best": mae.get("ratio_auto_vs_monai_best"),
        **{p: mae[p] for p in precisions},
        "peak_gflops": {k: round(statistics.mean(v), 1) for k, v in peak.items()},
        "peak_gflops_range": {k: [round(min(v), 1), round(max(v), 1)] for k, v in peak.items()},
        "load_average": round(os.getloadavg()[0], 2),
    }
    if args.cnn:
        out["simclr_resnet18"] = compare("simclr", args.cnn_size, args.cnn_batch, args.steps, precisions, peak)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
