"""One pre-training step as ``python -m pretrain`` runs it, against MONAI's model trained the way its users would.

    python benchmarks/pretrain_step.py [--steps 3] [--batch 4] [--size 96] [--precisions fp32,bf16] [--cnn]
    python benchmarks/pretrain_step.py --grid [--grid-sizes 64,96,128,160] [--grid-batches 1,2,4,8] [--precisions …]

MAE (always): ours is ``configs/pretrain/synthmri_mae.yaml`` (ViT-B/16 at 96³, mask 0.75, decoder 384 × 4,
norm-pix loss, AdamW β = (0.9, 0.95), clipping 1.0) at batch ``--batch`` and one micro-batch per step, stepped
through ``pretrain.engine.Engine`` (DeepSpeed, our optimizer settings and precision handling: in bf16, bf16
weights with fp32 masters) exactly as ``pretrain.trainer`` does: forward, the finite-loss check, backward,
step. MONAI's ``MaskedAutoEncoderViT`` at the same dimensions (768 × 12, MLP 3072, qkv bias; decoder 384 × 4,
MLP 1536) with ``torch.optim.AdamW``'s defaults and a masked-patch MSE; in bf16 with bf16 weights, as its model
fails under ``torch.autocast`` (its decoder's ``index_put`` mixes fp32 mask tokens with bf16 activations).

SimCLR (``--cnn``): ours is ``configs/pretrain/synthmri_simclr.yaml`` with a ResNet-18 through the engine; the
baseline the same objective (a copy with the same initial weights) in a plain PyTorch loop (forward, backward,
``torch.optim.AdamW`` defaults), at ``--cnn-size``³ (default 48: a ResNet-18 step at 96³ takes minutes on 2 cores).

Printed per precision: volumes/s of each, timed in this process, alternating the two round by round (load from
other processes hits both alike), and the ratio; peak memory of the training steps, each (model, precision) in a
fresh child process (``VmHWM``, reset once the model is built and checked, minus the RSS after imports: weights,
gradients, optimizer state and activations; building and checking ours peaks apart); each step's FLOPs
(``torch.utils.flop_counter``) as a share of this machine's matmul peak of that precision (the better of a 2048²
and a 3072² GEMM, measured in every timed round and averaged like the steps: these machines change speed over
minutes, so a peak from another moment would skew the share either way); the ratio a step doing our FLOPs would
reach at 100 % of that peak; and, from one profiled step of each, the share of the step spent in matrix products,
attention and convolutions, and the ratio our step would reach if nothing else in it took time (its products at
the speed they ran): the ceiling for anything but faster kernels; and that profiled step split by where its
time goes (``SPLIT``: GEMMs, attention, norms, convolutions, casts, the optimizer, the rest), ours beside the
baseline's, and our bf16 step's throughput over our fp32 step's (``bf16_vs_fp32``).
Then what ``precision: auto`` picks here (``pretrain.engine.train_precision``, which checks and times a step where
bf16 is native) and our throughput at it over MONAI's at its faster precision. The last line is one JSON object
with all of it. ``--grid`` instead measures the cost-growth table (``grid``): step time and peak memory of ours,
ours with activation checkpointing and MONAI's against input size and batch, with exponents time ∝ tokens^a.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import record_function

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MASK_RATIO = 0.75
OPTIMIZER = "benchmark.optimizer"  # the profiler range around each step's optimizer part
ENV_OF_A_WORLD = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_PORT")


# ---- our side: the recipe through the engine -----------------------------------------------------------------
def recipe(task: str, size: int, batch: int, checkpointing: bool = False):
    from common.config import load_config
    from pretrain.config import PretrainConfig

    name, extra = ("synthmri_mae", []) if task == "mae" else ("synthmri_simclr", ["model.backbone=resnet18"])
    overrides = [
        f"data.shape=[{size},{size},{size}]",
        f"data.batch_size={batch}",
        "optim.accumulation_steps=1",
        "optim.warmup_steps=1",
        "train.steps=100000",
        f"model.grad_checkpointing={checkpointing}",
        *extra,
    ]
    return load_config(PretrainConfig, REPO / f"configs/pretrain/{name}.yaml", overrides)


def build_objective(cfg) -> torch.nn.Module:
    from common.models import create_backbone
    from pretrain.objectives import build_objective as build

    kwargs = dict(cfg.model.kwargs)
    encoder = create_backbone(cfg.model.backbone, img_size=tuple(cfg.data.shape), **kwargs)
    if hasattr(encoder, "attn_backend"):
        encoder.attn_backend = cfg.model.attn_backend
    encoder.set_grad_checkpointing(cfg.model.grad_checkpointing)
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
        with record_function(OPTIMIZER):  # clipping, AdamW, bf16 write-back, the schedule
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
        with record_function(OPTIMIZER):
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def build_steps(
    task: str, size: int, batch: int, precision: str, which=("ours", "base"), checkpointing: bool = False
) -> dict:
    """{"ours": step, "base": step} (or those in ``which``) for one precision, with freshly built models; the
    SimCLR baseline starts from our initial weights. ``checkpointing``: ours recomputes its encoder's and its MAE
    decoder's blocks in the backward (``model.grad_checkpointing``; MONAI's model has no such switch)."""
    cfg = recipe(task, size, batch, checkpointing)
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


def _in_child(target, *args):
    """``target(*args, queue)`` run in a fresh process (a world of one of its own); what it puts on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def _memory_child(task: str, which: str, size: int, batch: int, precision: str, checkpointing: bool, queue) -> None:
    for key in ENV_OF_A_WORLD:  # a world of one of its own (the parent's port is taken)
        os.environ.pop(key, None)
    from pretrain.engine import init_distributed

    init_distributed()
    # the code both sides load (MONAI's package import alone pulls in transformers, pandas and matplotlib,
    # ~0.28 GiB) is in the baseline, so that each side's figure is its training memory, not the libraries'
    import monai.networks.nets  # noqa: F401

    import pretrain.objectives  # noqa: F401

    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    base = proc_status_gb("VmRSS")
    step = build_steps(task, size, batch, precision, (which,), checkpointing)[which]
    start = proc_status_gb("VmHWM") - base  # building the model and, in bf16, checking it
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS now (Linux >= 4.0): the steps' own peak next
        f.write("5")
    x = example_batch(task, size, batch)
    for _ in range(2):  # the second step has the optimizer state allocated: the steady-state peak
        step(x)
    peak = proc_status_gb("VmHWM") - base
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # glibc keeps freed blocks mapped; the RSS after this is what stays
    resident = proc_status_gb("VmRSS") - base  # between steps: weights, masters, optimizer state
    queue.put({"steps": peak, "start": start, "resident": resident})


def peak_memory_gb(
    task: str, which: str, size: int, batch: int, precision: str, checkpointing: bool = False
) -> dict[str, float]:
    """Peak memory in GiB above the imports of one model's training steps (``steps``: weights, gradients,
    optimizer state, activations), of building it and checking its bf16 step before them (``start``), and what
    stays between steps (``resident``: weights, masters, optimizer state), in a fresh child process. ``steps``
    minus ``resident`` is what a step itself needs: activations, gradients and temporaries."""
    return _in_child(_memory_child, task, which, size, batch, precision, checkpointing)


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


# Where a profiled step's time goes: an op's own time (and that of what it calls) counts under the first of
# these it is or runs inside, everything in the optimizer range (clipping, AdamW, bf16 write-back) as "optimizer"
SPLIT = {
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm"),
    "attention": (  # the fused kernels; a math attention's softmax (its products are GEMMs)
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
        "aten::_softmax",
        "aten::_softmax_backward_data",
    ),
    "norms": (
        "aten::native_layer_norm",
        "aten::native_layer_norm_backward",
        "aten::native_batch_norm",
        "aten::native_batch_norm_backward",
    ),
    "convolutions": ("aten::mkldnn_convolution", "aten::convolution_backward"),
    "casts": ("aten::_to_copy",),  # dtype conversions (autocast's weight and activation casts among them)
}
PRODUCTS = ("gemm", "attention", "convolutions")  # the kernels that do a step's counted FLOPs
_CATEGORY = {op: category for category, ops in SPLIT.items() for op in ops}


def profile_split(step, x: dict[str, torch.Tensor]) -> dict[str, float]:
    """Seconds of one profiled step per category: ``SPLIT``'s, ``optimizer`` and ``other`` (elementwise ops,
    copies, reshapes, autograd's own work)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(x)
    split = dict.fromkeys([*SPLIT, "optimizer", "other"], 0.0)
    for event in prof.events():
        names, e = [], event
        while e is not None:
            names.append(e.name)
            e = e.cpu_parent
        category = "optimizer" if OPTIMIZER in names else next((_CATEGORY[n] for n in names if n in _CATEGORY), "other")
        split[category] += event.self_cpu_time_total / 1e6
    return split


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
        split = {w: profile_split(pair[w], x) for w in pair}
        del pair
        vps = {w: batch * steps / t for w, t in elapsed.items()}
        peaks = {w: peak_memory_gb(task, w, size, batch, precision) for w in ("ours", "base")}
        mem = {w: p["steps"] for w, p in peaks.items()}
        rate = statistics.mean(peak[precision])  # GFLOP/s, over this and earlier rounds
        share = {w: flops[w] / (elapsed[w] / steps) / 1e9 / rate for w in elapsed}
        # the most any step doing our FLOPs could reach here: all of them at the measured matmul peak
        ceiling = rate * 1e9 * (elapsed["base"] / steps) / flops["ours"]
        # ... and if only its products took time, at the speed they ran in it (the ratio of profiled times)
        total = {w: sum(split[w].values()) for w in split}
        products = {w: sum(split[w][c] for c in PRODUCTS) for w in split}
        product_ceiling = total["base"] / products["ours"]
        product_share = {w: products[w] / total[w] for w in split}
        shares = {w: {c: round(t / total[w], 3) for c, t in split[w].items()} for w in split}
        results[precision] = {
            "ours_vol_s": round(vps["ours"], 3),
            f"{key}_vol_s": round(vps["base"], 3),
            "ratio": round(vps["ours"] / vps["base"], 3),
            "ours_peak_gib": round(mem["ours"], 3),
            f"{key}_peak_gib": round(mem["base"], 3),
            "memory_ratio": round(mem["ours"] / mem["base"], 3),
            "ours_start_peak_gib": round(peaks["ours"]["start"], 3),
            "gflop_per_step": round(flops["ours"] / 1e9, 1),
            f"{key}_gflop_per_step": round(flops["base"] / 1e9, 1),
            "share_of_peak": round(share["ours"], 3),
            f"{key}_share_of_peak": round(share["base"], 3),
            "ratio_ceiling_at_peak": round(ceiling, 3),
            "products_share_of_step": round(product_share["ours"], 3),
            f"{key}_products_share_of_step": round(product_share["base"], 3),
            "ratio_ceiling_products_only": round(product_ceiling, 3),
            "split": {"ours": shares["ours"], key: shares["base"]},
        }
        print(
            f"{task} {precision}: ours {vps['ours']:.2f} vol/s, {base_name} {vps['base']:.2f} vol/s -> "
            f"throughput ratio {vps['ours'] / vps['base']:.2f}x | peak memory ours {mem['ours']:.2f} GiB, "
            f"{base_name} {mem['base']:.2f} GiB -> ratio {mem['ours'] / mem['base']:.2f} (ours while built and "
            f"checked: {peaks['ours']['start']:.2f} GiB) | our step: "
            f"{flops['ours'] / 1e9:.0f} GFLOP, {share['ours']:.0%} of the {precision} matmul peak "
            f"({rate:.0f} GFLOP/s); {base_name}'s: {flops['base'] / 1e9:.0f} GFLOP, "
            f"{share['base']:.0%} | ceiling: our FLOPs at 100% of the peak would be {ceiling:.2f}x {base_name}\n"
            f"  profiled step: matrix products, attention and convolutions are {product_share['ours']:.0%} of ours, "
            f"{product_share['base']:.0%} of {base_name}'s; ours with nothing else would be "
            f"{product_ceiling:.2f}x {base_name}\n"
            f"  split of the profiled step (ours | {base_name}): "
            + ", ".join(f"{c} {shares['ours'][c]:.0%} | {shares['base'][c]:.0%}" for c in split["ours"]),
            flush=True,
        )
    if {"fp32", "bf16"} <= results.keys():  # our bf16 step's speed-up over our fp32 step (> 1: bf16 faster)
        results["bf16_vs_fp32"] = round(results["bf16"]["ours_vol_s"] / results["fp32"]["ours_vol_s"], 3)
        print(f"{task}: our bf16 step runs at {results['bf16_vs_fp32']:.2f}x our fp32 step's throughput", flush=True)
    torch.manual_seed(0)
    auto, why = train_precision(build_objective(recipe(task, size, batch)), x, "auto")
    print(f"{task}: precision auto -> {auto} ({why})", flush=True)
    summary = {"auto_precision": auto, "reason": why, **results}
    if auto in results:
        best = max(results[p][f"{key}_vol_s"] for p in precisions)
        summary[f"ratio_auto_vs_{key}_best"] = round(results[auto]["ours_vol_s"] / best, 3)
    return summary


# the grid's columns: ours, ours with activation checkpointing (MONAI's model has no such switch), MONAI's
VARIANTS = {"ours": ("ours", False), "ours_ckpt": ("ours", True), "monai": ("base", False)}


def _grid_times_child(size: int, batch: int, precision: str, steps: int, queue) -> None:
    """Seconds per step of each of ``VARIANTS`` at one grid cell, timed alternately (a process per cell: the
    engines of a cell are not all freed when it ends, and a whole grid in one process runs out of memory)."""
    for key in ENV_OF_A_WORLD:
        os.environ.pop(key, None)
    from pretrain.engine import init_distributed

    init_distributed()
    x = example_batch("mae", size, batch)
    built = {v: build_steps("mae", size, batch, precision, (w,), ckpt)[w] for v, (w, ckpt) in VARIANTS.items()}
    for step in built.values():  # warm-up: allocator, optimizer state, oneDNN kernels
        step(x)
    seconds = dict.fromkeys(built, 0.0)
    for _ in range(steps):
        for v, step in built.items():
            start = time.perf_counter()
            step(x)
            seconds[v] += (time.perf_counter() - start) / steps
    queue.put(seconds)


def grid(sizes: list[int], batches: list[int], precisions: list[str], steps: int) -> dict:
    """The cost-growth table: seconds per MAE step and peak memory of each of ``VARIANTS`` at every input size
    (cubes) and batch, per precision, timed alternately in a process per cell; then per precision, variant and batch
    the exponent ``a`` of time ∝ tokens^a fitted (least squares in log-log) over the sizes."""
    import numpy as np

    rows = []
    print(
        "precision  size batch tokens |   ours s    GiB | +ckpt s    GiB |  MONAI s    GiB | ours/MONAI time  mem | "
        "ckpt/ours time  mem | step GiB: ours +ckpt ratio",
        flush=True,
    )
    for precision in precisions:
        for size in sizes:
            for batch in batches:
                seconds = _in_child(_grid_times_child, size, batch, precision, steps)
                peaks = {v: peak_memory_gb("mae", w, size, batch, precision, ckpt) for v, (w, ckpt) in VARIANTS.items()}
                mem = {v: p["steps"] for v, p in peaks.items()}
                # what the step needs above the state kept between steps: activations, gradients, temporaries
                step_mem = {v: p["steps"] - p["resident"] for v, p in peaks.items()}
                row = {"precision": precision, "size": size, "batch": batch, "tokens": (size // 16) ** 3}
                row.update({f"{v}_s": round(seconds[v], 3) for v in VARIANTS})
                row.update({f"{v}_gib": round(mem[v], 3) for v in VARIANTS})
                row.update({f"{v}_step_gib": round(step_mem[v], 3) for v in VARIANTS})
                rows.append(row)
                print(
                    f"{precision:>9} {size:5d} {batch:5d} {row['tokens']:6d} | "
                    + " | ".join(f"{seconds[v]:8.3f} {mem[v]:6.2f}" for v in VARIANTS)
                    + f" | {seconds['ours'] / seconds['monai']:15.2f} {mem['ours'] / mem['monai']:4.2f} | "
                    f"{seconds['ours_ckpt'] / seconds['ours']:14.2f} {mem['ours_ckpt'] / mem['ours']:4.2f} | "
                    f"{step_mem['ours']:14.2f} {step_mem['ours_ckpt']:5.2f} "
                    f"{step_mem['ours_ckpt'] / step_mem['ours']:5.2f}",
                    flush=True,
                )
    exponents: dict[str, dict[str, dict[int, float]]] = {}
    for precision in precisions:
        for v in VARIANTS:
            for batch in batches:
                points = [
                    (r["tokens"], r[f"{v}_s"]) for r in rows if (r["precision"], r["batch"]) == (precision, batch)
                ]
                if len(points) >= 2:
                    a = np.polyfit(*np.log(np.array(points, dtype=float)).T, 1)[0]
                    exponents.setdefault(precision, {}).setdefault(v, {})[batch] = round(float(a), 2)
    for precision, by_variant in exponents.items():
        for v, by_batch in by_variant.items():
            fits = ", ".join(f"batch {b}: {a:.2f}" for b, a in by_batch.items())
            print(f"time ∝ tokens^a, {precision} {v}: {fits}", flush=True)
    return {"rows": rows, "exponents": exponents}


def cpu_flags() -> str:
    """The CPU flags that decide bf16 here (Linux's /proc/cpuinfo) and torch's vector capability."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    shown = [w for w in wanted if w in flags] or ["(no /proc/cpuinfo flags)"]
    return f"{' '.join(shown)}; torch capability {torch.backends.cpu.get_cpu_capability()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and precision")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--cnn", action="store_true", help="also SimCLR with a ResNet-18 vs a plain loop")
    parser.add_argument("--cnn-size", type=int, default=48)
    parser.add_argument("--cnn-batch", type=int, default=4)
    parser.add_argument(
        "--grid", action="store_true", help="instead: the cost-growth table over --grid-sizes × --grid-batches"
    )
    parser.add_argument("--grid-sizes", default="64,96,128,160", help="comma-separated cube sides (multiples of 16)")
    parser.add_argument("--grid-batches", default="1,2,4,8", help="comma-separated batch sizes")
    args = parser.parse_args()
    precisions = [p for p in args.precisions.split(",") if p]
    if not set(precisions) <= {"fp32", "bf16"}:
        parser.error(f"--precisions takes fp32 and/or bf16, got {args.precisions!r}")
    try:
        sizes = [int(v) for v in args.grid_sizes.split(",") if v]
        batches = [int(v) for v in args.grid_batches.split(",") if v]
    except ValueError:
        parser.error(
            f"--grid-sizes and --grid-batches take comma-separated integers, got {args.grid_sizes!r}, "
            f"{args.grid_batches!r}"
        )
    if not sizes or any(v <= 0 or v % 16 for v in sizes) or not batches or any(v <= 0 for v in batches):
        parser.error("--grid-sizes takes positive multiples of the patch size 16, --grid-batches positive integers")

    from common.precision import bf16_native
    from pretrain.engine import init_distributed

    init_distributed()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {bf16_native('cpu')}, "
        f"CPU flags: {cpu_flags()}, load average {os.getloadavg()[0]:.1f}; MAE "
        + (f"grid {sizes}³ × batches {batches}" if args.grid else f"batch {args.batch} × {args.size}³")
        + f", mask {MASK_RATIO}",
        flush=True,
    )
    if args.grid:
        table = grid(sizes, batches, precisions, args.steps)
        print(json.dumps({"grid": table, "cpu_flags": cpu_flags(), "load_average": round(os.getloadavg()[0], 2)}))
        return
    peak: dict[str, list[float]] = {}  # per precision, the GEMM rate of every timed round
    mae = compare("mae", args.size, args.batch, args.steps, precisions, peak)
    out = {
        "auto_precision": mae["auto_precision"],
        "ratio_auto_vs_monai_best": mae.get("ratio_auto_vs_monai_best"),
        **{p: mae[p] for p in precisions},
        "bf16_vs_fp32": mae.get("bf16_vs_fp32"),
        "peak_gflops": {k: round(statistics.mean(v), 1) for k, v in peak.items()},
        "peak_gflops_range": {k: [round(min(v), 1), round(max(v), 1)] for k, v in peak.items()},
        "load_average": round(os.getloadavg()[0], 2),
    }
    if args.cnn:
        out["simclr_resnet18"] = compare("simclr", args.cnn_size, args.cnn_batch, args.steps, precisions, peak)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
