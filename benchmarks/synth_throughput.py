"""Synthetic-MRI throughput: volumes/s made on the fly vs read back from .nii.gz vs read from packed shards.

For each spacing: ``SyntheticMRIStream`` (the synthetic stream pre-training reads) a volume at a time through a
DataLoader with one worker per core (pre-training's worker path), then the same volumes written as .nii.gz and read
back with nibabel through the same DataLoader set-up. The ratio > 1 means generating is faster than reading files,
i.e. the on-the-fly corpus is not the bottleneck. Worker start-up is excluded (the clock starts once every worker
has delivered its first volume). On a shared machine the wall-clock columns drop with the other processes' load, so
the script also measures CPU seconds per volume (one thread, generation and reading) and the rate they imply on
``--workers`` idle cores. Last, the same volumes are packed (``common.data.packed``, uint8, no resampling) and read
back memory-mapped through the same DataLoader set-up: volumes/s and CPU seconds per volume against the .nii.gz
reader, in the same run. And the stream's batched path (``device="cpu"``: ``Generator.batch``, 4 subjects per call;
pre-training's in-process path, here on the CPU) against one volume at a time, in CPU seconds per volume (one
thread).

    python benchmarks/synth_throughput.py [--spacings 1 2] [--seconds 20] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from common.data import PreprocessConfig
from common.data.nifti import write_nifti
from common.data.packed import PackedVolumes, pack_manifest
from synth.anatomy import output_affine
from synth.config import SynthConfig
from synth.dataset import SyntheticMRIStream

TARGETS = {1.0: 2.0, 2.0: 15.0}  # vol/s on 2 cores, from the build issue


class PackedFiles(Dataset):
    """The same volumes from packed shards: memory-mapped uint8, dequantised to float32 (1, D, H, W)."""

    def __init__(self, directory: Path):
        self.volumes = PackedVolumes(directory)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.volumes[i]


def pack(paths: list[Path], spacing: float, shape: tuple[int, int, int], folder: Path) -> Path:
    """Pack the .nii.gz files as pre-training would: no resampling (same spacing), [0, 1] kept, uint8."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.csv"
    pd.DataFrame({"path": [str(p) for p in paths], "subject_id": [p.stem for p in paths]}).to_csv(manifest, index=False)
    cfg = PreprocessConfig(spacing=(spacing,) * 3, shape=shape, intensity="none", crop_foreground=False)
    pack_manifest(manifest, folder / "packed", cfg, dtype="uint8")
    return folder / "packed"


class NiftiFiles(Dataset):
    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(nib.load(self.paths[i]).get_fdata(dtype=np.float32)))[None]


def rate(loader: DataLoader, warm: int, keep: list | None = None) -> tuple[float, int]:
    """Volumes/s after the first ``warm`` items (worker start-up excluded); ``keep`` collects a stream's volumes."""
    n, start = 0, None
    for i, x in enumerate(loader):
        if keep is not None:
            keep.append(x["image"][0].clone())  # batches of one (1, 1, D, H, W) -> (1, D, H, W)
        if i + 1 == warm:
            start = time.perf_counter()
        elif i + 1 > warm:
            n += 1
    return n / (time.perf_counter() - start), n


def cpu_seconds(items, n: int) -> float:
    """CPU seconds (this process, one thread) per item over ``n`` items after one warm-up; unlike wall time
    it is hardly inflated by other processes competing for the cores."""
    it = iter(items)
    next(it)
    start = time.process_time()
    for _ in range(n):
        next(it)
    return (time.process_time() - start) / n


def batched_cpu_seconds(cfg: SynthConfig, batch: int, calls: int = 2) -> float:
    """CPU seconds per volume of the stream's batched path (one thread, on the CPU) after one warm-up batch."""
    return cpu_seconds(SyntheticMRIStream(cfg, seed=3, batch_size=batch, device="cpu"), calls) / batch


def measure(spacing: float, seconds: float, workers: int, tmp: Path) -> dict[str, float]:
    cfg = SynthConfig(spacing=spacing)
    # single process, single thread: the per-volume cost
    torch.set_num_threads(1)
    single, _ = rate(iter(SyntheticMRIStream(cfg, seed=0, length=4)), warm=1)
    gen_cpu = cpu_seconds(SyntheticMRIStream(cfg, seed=2, length=9), 8)
    batched_cpu = batched_cpu_seconds(cfg, batch=4)
    torch.set_num_threads(workers)
    n = max(workers * 3, int(seconds * single * workers) + workers)
    kept: list[torch.Tensor] = []
    stream = SyntheticMRIStream(cfg, seed=1, length=n)
    gen, counted = rate(DataLoader(stream, batch_size=None, num_workers=workers), warm=workers, keep=kept)
    affine = output_affine(spacing, cfg.shape)
    paths = []
    for i, x in enumerate(kept):
        paths.append(write_nifti(x, tmp / f"{spacing}-{i}.nii.gz", spacing=(spacing,) * 3, affine=affine))
    read, _ = rate(DataLoader(NiftiFiles(paths), batch_size=None, num_workers=workers), warm=workers)
    torch.set_num_threads(1)
    read_cpu = cpu_seconds((NiftiFiles(paths)[i] for i in range(9)), 8)
    packed_dir = pack(paths, spacing, cfg.shape, tmp / f"{spacing}")
    packed, _ = rate(DataLoader(PackedFiles(packed_dir), batch_size=None, num_workers=workers), warm=workers)
    files = PackedFiles(packed_dir)
    packed_cpu = cpu_seconds((files[i % len(files)] for i in range(201)), 200)  # ~ms each: more items
    size_mb = float(np.mean([p.stat().st_size for p in paths]) / 1e6)
    return {
        "spacing": spacing,
        "single": single,
        "gen": gen,
        "read": read,
        "n": counted,
        "mb": size_mb,
        "gen_cpu": gen_cpu,
        "read_cpu": read_cpu,
        "batched_cpu": batched_cpu,
        "packed": packed,
        "packed_cpu": packed_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spacings", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--seconds", type=float, default=20.0, help="about how long each generation run lasts")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    print(f"cores: {args.workers}  load average before: {os.getloadavg()[0]:.1f}  torch {torch.__version__}")
    print(
        f"{'spacing':>7} {'shape':>13} {'1 thread':>9} {'generate':>9} {'read .nii.gz':>12} {'ratio':>6} "
        f"{'target':>7} | {'CPU s/vol gen':>13} {'read':>6} {'idle-core estimate':>19} {'ratio':>6}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for spacing in args.spacings:
            r = measure(spacing, args.seconds, args.workers, Path(tmp))
            shape = "x".join(map(str, SynthConfig(spacing=spacing).shape))
            target = TARGETS.get(spacing)
            verdict = "-" if target is None else f"{target:.0f}"
            estimate = args.workers / r["gen_cpu"]
            print(
                f"{spacing:>5.1f}mm {shape:>13} {r['single']:>7.2f}/s {r['gen']:>7.2f}/s "
                f"{r['read']:>10.2f}/s {r['gen'] / r['read']:>6.2f} {verdict:>5}/s | {r['gen_cpu']:>13.3f} "
                f"{r['read_cpu']:>6.3f} {estimate:>15.1f} vol/s {r['read_cpu'] / r['gen_cpu']:>6.2f}"
                f"   ({r['n']} volumes timed, {r['mb']:.1f} MB per .nii.gz)"
            )
            print(
                f"{'':>7} batched generation (Generator.batch, 4 per call, CPU) vs per-volume: CPU s/vol "
                f"{r['batched_cpu']:.3f} vs {r['gen_cpu']:.3f} -> ratio {r['gen_cpu'] / r['batched_cpu']:.2f}"
            )
            print(
                f"{'':>7} packed shards (uint8, memory-mapped) vs .nii.gz, same volumes: {r['packed']:.1f} vs "
                f"{r['read']:.1f} vol/s; CPU s/vol {r['packed_cpu']:.5f} vs {r['read_cpu']:.4f} -> packed reading is "
                f"{r['read_cpu'] / r['packed_cpu']:.0f}x cheaper per volume (target >= 10x)"
            )
    print(f"load average after: {os.getloadavg()[0]:.1f} (other processes on the machine slow both columns)")


if __name__ == "__main__":
    main()
