"""Sampling throughput of the latent-diffusion generator against the anatomy-model generator (the baseline).

Both make volumes of the quickstart size (``configs/synth/quickstart.yaml``: 2 mm, 80x96x80) in this one
process, taking turns volume by volume so that load from other processes on a shared machine falls on both
alike. The anatomy model makes one volume per call (``synth.generator.Generator``, image only: what
``generate`` writes, minus the file); the LDM runs ``--ddim-steps`` UNet evaluations plus one decode per
batch. Weights do not change the LDM's speed: without ``--model`` it has the networks of
``configs/synth/ldm_quickstart.yaml`` with random weights, at the anatomy model's size. Printed: volumes per
minute of each and the ratio LDM / anatomy model.

Run: ``python -m benchmarks.ldm_sampling`` (a few minutes on 2 CPU cores). Options: ``--model DIR`` (a
trained LDM or the MONAI bundle, at its own size), ``--ddim-steps`` (default 50, the bundle's),
``--batch-size``, ``--volumes``, ``--threads``, ``--device``, ``--precision``; ``--figure PNG`` also saves
samples of ``--model`` across ``--ages`` from one noise (the picture in ``docs/synth_ldm.md``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from common.config import load_config, to_object
from common.precision import PRECISIONS, resolve_device, resolve_precision
from synth.config import SynthConfig
from synth.generator import Generator
from synth.ldm.config import LDMTrainConfig
from synth.ldm.covariates import CovariateSpace
from synth.ldm.figures import age_sweep, save_age_sweep_png
from synth.ldm.load import load_model
from synth.ldm.model import LatentDiffusionModel, assemble
from synth.ldm.sampling import generate
from synth.subject import corpus_plan

ROOT = Path(__file__).resolve().parents[1]


def random_quickstart_ldm(shape: tuple[int, ...], spacing: float) -> LatentDiffusionModel:
    """The quickstart LDM's networks at ``shape`` with random weights (the cost of trained ones)."""
    cfg: LDMTrainConfig = to_object(load_config(LDMTrainConfig, ROOT / "configs/synth/ldm_quickstart.yaml"))
    ae_kwargs = cfg.autoencoder.kwargs()
    unet_kwargs = cfg.unet.kwargs(cfg.autoencoder.latent_channels, 4)
    ae, unet = assemble(ae_kwargs, unet_kwargs, cfg.unet.conditioning in ("concat", "both"), "quickstart")
    return LatentDiffusionModel(
        autoencoder=ae,
        unet=unet,
        autoencoder_kwargs=ae_kwargs,
        unet_kwargs=unet_kwargs,
        noise=asdict(cfg.noise),
        scale_factor=1.0,
        image_shape=tuple(shape),
        spacing=(spacing,) * 3,
        covariates=CovariateSpace.identity(),
    ).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="trained LDM or bundle folder (default: random quickstart)")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--volumes", type=int, default=4, help="timed volumes of each (after one warm-up)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--figure", type=Path, help="also save a PNG of --model's samples across --ages")
    p.add_argument("--ages", type=float, nargs="+", default=[20, 40, 60, 80], help="for --figure (model units)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    synth_cfg: SynthConfig = to_object(load_config(SynthConfig, ROOT / "configs/synth/quickstart.yaml"))
    anatomy = Generator(synth_cfg)
    if args.model:
        ldm = load_model(args.model)
    else:
        ldm = random_quickstart_ldm(synth_cfg.shape, synth_cfg.spacing)
    ldm.to(device)
    cond = torch.full((args.batch_size, 4), 0.5)

    def anatomy_volume(i: int) -> None:
        anatomy(corpus_plan(synth_cfg, 0, i))

    def ldm_batch(i: int) -> None:
        seeds = [i * args.batch_size + b for b in range(args.batch_size)]
        generate(ldm, cond, seeds, args.ddim_steps, device, precision)
        if device.type == "cuda":
            torch.cuda.synchronize()

    anatomy_volume(0)  # warm-up: template resampling is cached on first use
    ldm_batch(0)
    anat_s, ldm_s = [], []
    for i in range(1, args.volumes + 1):  # turns: one anatomy volume, then one LDM batch
        t = time.perf_counter()
        anatomy_volume(i)
        anat_s.append(time.perf_counter() - t)
        if (i - 1) % args.batch_size == 0:
            t = time.perf_counter()
            ldm_batch(i)
            ldm_s.append((time.perf_counter() - t) / args.batch_size)

    anat_rate, ldm_rate = 60 / statistics.median(anat_s), 60 / statistics.median(ldm_s)
    print(f"device {device}, {torch.get_num_threads()} threads, precision {precision}")
    print(f"anatomy model  {tuple(synth_cfg.shape)} @ {synth_cfg.spacing} mm: {anat_rate:8.2f} volumes/min")
    print(
        f"LDM {'(' + str(args.model) + ')' if args.model else '(quickstart, random weights)'} "
        f"{ldm.image_shape} @ {ldm.spacing[0]} mm, {args.ddim_steps} DDIM steps, batch {args.batch_size}: "
        f"{ldm_rate:8.2f} volumes/min"
    )
    print(f"ratio LDM / anatomy model: {ldm_rate / anat_rate:.3f}x")

    if args.figure:
        if not args.model:
            p.error("--figure needs --model (random weights make noise)")
        volumes = age_sweep(ldm, args.ages, seed=0, ddim_steps=args.ddim_steps, device=device, precision=precision)
        title = f"{args.model.name}: {args.ddim_steps} DDIM steps, one noise, other covariates at the median"
        print(f"figure: {save_age_sweep_png(volumes, args.ages, args.figure, title)}")


if __name__ == "__main__":
    main()
