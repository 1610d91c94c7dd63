"""One device check (<= 8 min): the parts of the stack that only a GPU exercises, run once, one JSON line out.

    python benchmarks/gpu_check.py [--budget 480]

Parts (each a key of ``parts`` in the JSON line; whatever cannot run here is named in ``skipped`` with why):
- ``attention``: xformers against SDPA at ViT-B shapes (12 heads × 64; 216 and 1728 tokens), bf16, forward and
  backward: largest difference relative to the output's scale, and the time ratio xformers / SDPA. On a CPU,
  SDPA against the ``math`` reference instead (fp32, 216 tokens).
- ``mae_step``: the bf16 ViT-B/16 MAE step at 96³ (mask 0.75, AdamW), volumes/s and MFU: the step's FLOPs
  (``torch.utils.flop_counter``) per second over the measured bf16 GEMM peak and over the GPU's nominal dense
  bf16 peak when the name is known. On a CPU, a 2-block ViT at 32³ in fp32 (bf16 is emulated on most CPUs).
- ``synth``: synthetic volumes/s at 2 mm (80×96×80, the 96³ input after padding) from ``Generator.batch`` on
  the device (64 per call on CUDA, 4 on a CPU) and its host CPU seconds per volume (the per-subject lattice stage
  stays on the CPU); on a CPU also the per-volume generator for comparison.
- ``zero2`` and ``data_wait``: one short pre-training run, ``python pretrain/main.py`` with
  ``configs/deepspeed/zero2.json`` (ZeRO-2; NCCL on CUDA, gloo on a CPU), on-the-fly ``synthmri``: it must
  finish with a finite loss and an export; its ``data_wait_share`` (share of the run spent waiting for data)
  is the data-wait part. On CUDA: ViT-B/16 at 96³, bf16, batch 8, 30 steps, one DataLoader worker per core,
  then the same run with ``data.synthmri.device=cuda`` (batches generated in the training process on the GPU:
  ``zero2_on_device``, ``data_wait_on_device``); on a CPU: a 2-block ViT at 32³ (4 mm), 6 steps, workers only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.attention import interleaved_seconds  # noqa: E402
from common.attention import scaled_dot_product, xformers_available  # noqa: E402
from common.precision import bf16_native  # noqa: E402

NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, SXM where it differs
TINY_VIT = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}


def sig(x: float) -> float:
    """Four significant digits (tiny CPU models and large GPU ones in the same fields)."""
    return float(f"{x:.4g}")


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- attention -------------------------------------------------------------------------------------------
def attention_outputs(backend: str, q, k, v) -> list[torch.Tensor]:
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = scaled_dot_product(q, k, v, backend=backend)
    out.float().square().sum().backward()
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


def part_attention(device: torch.device, skipped: dict[str, str]) -> dict:
    if device.type == "cuda" and not xformers_available():
        skipped["attention.xformers"] = "xformers is not installed (pip install 'neurotransfer[cuda]')"
    if device.type == "cuda" and xformers_available():
        reference, candidate, dtype, token_counts = "sdpa", "xformers", torch.bfloat16, (216, 1728)
    else:
        if device.type != "cuda":
            skipped["attention.xformers"] = "no CUDA device (xformers runs on CUDA only); SDPA vs math instead"
        reference, candidate, dtype, token_counts = "math", "sdpa", torch.float32, (216,)
    rows = []
    for tokens in token_counts:
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 12, tokens, 64, device=device, dtype=dtype) for _ in range(3))
        ref, got = attention_outputs(reference, q, k, v), attention_outputs(candidate, q, k, v)
        rel = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(got, ref))

        def step(backend: str, q=q, k=k, v=v):
            x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            return lambda: scaled_dot_product(*x, backend=backend).sum().backward()

        seconds = interleaved_seconds({b: step(b) for b in (reference, candidate)}, device, warmup=2, repeats=5)
        rows.append(
            {
                "tokens": tokens,
                "max_rel_diff": round(rel, 6),
                "time_ratio": round(seconds[candidate] / seconds[reference], 3),
                f"{reference}_ms": round(seconds[reference] * 1e3, 3),
                f"{candidate}_ms": round(seconds[candidate] * 1e3, 3),
            }
        )
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    return {
        "compared": f"{candidate} vs {reference}",
        "dtype": str(dtype).removeprefix("torch."),
        "parity": all(r["max_rel_diff"] <= tolerance for r in rows),
        "tolerance": tolerance,
        "rows": rows,
    }


# ---- MAE step --------------------------------------------------------------------------------------------
def gemm_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    reps, start = (20 if device.type == "cuda" else 3), time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def part_mae_step(device: torch.device, skipped: dict[str, str]) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from common.models import create_backbone
    from pretrain.objectives.mae import MaskedAutoencoder

    cuda = device.type == "cuda"
    bf16 = bf16_native(device)
    if not bf16:
        skipped["mae_step.bf16"] = f"{device.type} has no native bf16 (emulated bf16 is slower): timed in fp32"
    if cuda:
        size, batch, kwargs, decoder = 96, 32, {}, (384, 4, 12)
    else:
        size, batch, kwargs, decoder = 32, 2, TINY_VIT, (32, 1, 4)
        skipped["mae_step.vit_base_96"] = "no CUDA device: a 2-block ViT at 32³ instead of ViT-B/16 at 96³"
    encoder = create_backbone("vit_base_p16", img_size=size, attn_backend="auto", **kwargs)
    model = MaskedAutoencoder(encoder, 0.75, "random", True, *decoder).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    x = torch.rand(batch, 1, size, size, size, device=device)
    dtype = torch.bfloat16 if bf16 else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model({"image": x})["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(2):
        step()
    times = []
    for _ in range(10 if cuda else 3):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    achieved = flops / seconds / 1e12
    peak = gemm_peak_tflops(device, dtype)
    result = {
        "model": "ViT-B/16 MAE" if cuda else "ViT 2x64, patch 8, MAE",
        "size": size,
        "batch": batch,
        "precision": "bf16" if bf16 else "fp32",
        "tflop_per_step": sig(flops / 1e12),
        "volumes_per_s": round(batch / seconds, 2),
        "achieved_tflops": sig(achieved),
        "gemm_peak_tflops": sig(peak),
        "mfu_of_gemm_peak": sig(achieved / peak),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
    }
    name = torch.cuda.get_device_name(device) if cuda else ""
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
    if cuda and bf16 and nominal:
        result["mfu_of_nominal_bf16"] = sig(achieved / nominal)
    elif cuda:
        skipped["mae_step.nominal_mfu"] = f"no nominal bf16 peak known for {name!r}"
    return result


# ---- synthetic volumes -----------------------------------------------------------------------------------
def part_synth(device: torch.device, skipped: dict[str, str]) -> dict:
    from synth.config import SynthConfig
    from synth.generator import Generator
    from synth.subject import corpus_plan

    cfg = SynthConfig(spacing=2.0)
    cuda = device.type == "cuda"
    generator, batch = Generator(cfg), (64 if cuda else 4)
    generator(corpus_plan(cfg, 0, 0))  # template caches
    result: dict = {"shape": list(cfg.shape), "threads": torch.get_num_threads(), "batch": batch}
    if cuda:
        skipped["synth.per_volume"] = "the per-volume generator is CPU-only; measured on CPUs (synth_throughput.py)"
    else:
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(1, batch + 1):
            generator(corpus_plan(cfg, 0, i))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        result["per_volume"] = {"volumes_per_s": sig(batch / wall), "cpu_s_per_volume": sig(cpu / batch)}
    generator.batch([corpus_plan(cfg, 1, i) for i in range(batch)], device)  # warm-up (kernels, device copy)
    rounds = 4 if cuda else 1
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for r in range(rounds):
        generator.batch([corpus_plan(cfg, 2, r * batch + i) for i in range(batch)], device)
    sync(device)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = rounds * batch
    result["batched"] = {
        "device": device.type,
        "volumes_per_s": sig(n / wall),
        "host_cpu_s_per_volume": sig(cpu / n),  # the lattice stage stays on the CPU
    }
    return result


# ---- ZeRO-2 run and its data wait ------------------------------------------------------------------------
def part_run(
    device: torch.device, budget: Budget, skipped: dict[str, str], in_process: bool = False
) -> tuple[dict, dict]:
    """The ZeRO-2 run; ``in_process``: synthmri generated in the training process on the GPU
    (``data.synthmri.device=cuda``) instead of by DataLoader workers."""
    from deepspeed.accelerator import get_accelerator

    cuda = device.type == "cuda"
    workers = 0 if in_process else max(1, min(15, (os.cpu_count() or 2) - 1))
    if cuda:
        data = {"shape": [96] * 3, "spacing": [2.0] * 3, "batch_size": 8, "num_workers": workers}
        data["synthmri"] = {"device": "cuda" if in_process else "cpu"}
        model, train = {"backbone": "vit_base_p16"}, {"steps": 30, "precision": "bf16", "log_every": 5}
        objective = {"mae": {}}
    else:
        skipped["zero2.nccl"] = "no CUDA device: ZeRO-2 on gloo, 2-block ViT at 32³"
        data = {"shape": [32] * 3, "spacing": [4.0] * 3, "batch_size": 2, "num_workers": 1}
        model, train = {"backbone": "vit_base_p16", "kwargs": TINY_VIT}, {"steps": 6, "precision": "fp32"}
        objective = {"mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4}}
    data["prefetch_factor"] = 2
    train |= {"image_every": 0, "checkpoint_every": 0, "log_every": train.get("log_every", 2)}
    cfg = {"corpus": "synthmri", "data": data, "model": model, "objective": objective, "train": train}
    cfg["optim"] = {"warmup_steps": 2}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "run.yaml").write_text(yaml.safe_dump(cfg))
        argv = [sys.executable, str(REPO / "pretrain/main.py"), "--config", str(Path(tmp) / "run.yaml")]
        argv += ["--deepspeed_config", str(REPO / "configs/deepspeed/zero2.json"), "--out", f"{tmp}/run"]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env["PYTHONPATH"] = str(REPO)
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=max(30, budget.left() - 10))
        wall = time.perf_counter() - start
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        result = json.loads(lines[-1]) if proc.returncode == 0 and lines else {}
        exported = (Path(tmp) / "run/export/encoder.safetensors").is_file()
        metrics = (
            [json.loads(ln) for ln in (Path(tmp) / "run/metrics.jsonl").read_text().splitlines()]
            if (Path(tmp) / "run/metrics.jsonl").is_file()
            else []
        )
    ok = proc.returncode == 0 and result.get("step") == train["steps"] and result.get("loss") == result.get("loss")
    zero2 = {
        "ok": bool(ok and exported),
        "backend": get_accelerator().communication_backend_name(),
        "zero_stage": 2,
        "steps": result.get("step"),
        "loss": result.get("loss"),
        "wall_s": round(wall, 1),
    }
    if not ok:
        zero2["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    wait = {
        "corpus": "synthmri on the fly, " + ("in process on the GPU" if in_process else "DataLoader workers"),
        "num_workers": data["num_workers"],
        "data_wait_share": result.get("data_wait_share"),
        "volumes_per_s": sig(metrics[-1]["volumes_per_s"]) if metrics else None,
        "windows": [round(m["data_wait_share"], 3) for m in metrics],
    }
    return zero2, wait


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all parts together")
    args = parser.parse_args(argv)
    budget = Budget(args.budget)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "parts": {},
        "skipped": {},
    }
    skipped = report["skipped"]
    parts = [
        ("attention", lambda: part_attention(device, skipped), 60),
        ("mae_step", lambda: part_mae_step(device, skipped), 90),
        ("synth", lambda: part_synth(device, skipped), 60),
        ("zero2+data_wait", lambda: part_run(device, budget, skipped), 60),
        ("zero2+data_wait_on_device", lambda: part_run(device, budget, skipped, in_process=True), 60),
    ]
    for name, run, needs in parts:
        if name == "zero2+data_wait_on_device" and device.type != "cuda":
            skipped[name] = "no CUDA device: synthmri generated in the training process on a GPU not run"
            continue
        if budget.left() < needs:
            skipped[name] = f"time budget: {budget.left():.0f} s left of {args.budget:.0f}, the part needs ~{needs} s"
            continue
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            out = run()
        except Exception as e:  # a failing part is reported and the others still run
            report["parts"][name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        if name == "zero2+data_wait":
            report["parts"]["zero2"], report["parts"]["data_wait"] = out
        elif name == "zero2+data_wait_on_device":
            report["parts"]["zero2_on_device"], report["parts"]["data_wait_on_device"] = out
        else:
            report["parts"][name] = out
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
