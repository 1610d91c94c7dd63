"""Stage 2 of the LDM: a conditional diffusion UNet on the frozen autoencoder's scaled latents.

Epsilon prediction with MONAI's ``DDPMScheduler`` noising and ``LatentDiffusionInferer`` (which encodes the
images and scales the latents); the covariates go in through :class:`~synth.ldm.networks.ConditionedUNet`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import LatentDiffusionInferer
from monai.networks.nets import AutoencoderKL

from common.precision import autocast
from common.tb import RankZeroWriter, progress
from synth.ldm.config import LDMTrainConfig, latent_shape
from synth.ldm.figures import axial_strip
from synth.ldm.networks import ConditionedUNet, training_scheduler
from synth.ldm.run_state import load_state, log_metrics, save_state
from synth.ldm.training_data import BadSampleGuard

log = logging.getLogger(__name__)


@torch.no_grad()
def latent_scale_factor(ae: AutoencoderKL, x: torch.Tensor, device: torch.device, precision: str) -> float:
    """``1 / std`` of one batch's latents, so diffusion sees unit-variance inputs (Rombach et al. 2022)."""
    with autocast(device, precision):
        z = ae.encode_stage_2_inputs(x)  # (B, C, d, h, w)
    std = float(z.float().std())
    return 1.0 / std if std > 0 else 1.0


def train_diffusion(
    ae: AutoencoderKL,
    unet: ConditionedUNet,
    batches: Iterator[dict],
    guard: BadSampleGuard,
    cfg: LDMTrainConfig,
    run: Path,
    writer: RankZeroWriter,
    device: torch.device,
    precision: str,
    preview: Callable[[float], torch.Tensor] | None = None,
) -> float:
    """Train (or resume, from ``run/checkpoints/diffusion.pt``) to ``cfg.train_diffusion.steps``.

    ``preview(scale_factor)``, if given, returns sampled volumes ``(B, 1, D, H, W)`` for TensorBoard.
    Returns the latent scale factor.
    """
    tc = cfg.train_diffusion
    ckpt = run / "checkpoints" / "diffusion.pt"
    ae.to(device).eval().requires_grad_(False)
    unet.to(device).train()
    opt = torch.optim.Adam(unet.parameters(), lr=tc.lr)
    scheduler = training_scheduler(_noise_kwargs(cfg))
    shape = latent_shape(cfg)  # (C, d, h, w)

    step, scale = 0, float(tc.scale_factor)
    state = load_state(ckpt)
    if state is not None:
        unet.unet.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, scale = int(state["step"]), float(state["scale_factor"])
        log.info("diffusion: resumed at step %d from %s", step, ckpt)

    def checkpoint() -> None:
        save_state(
            ckpt,
            {"model": unet.unet.state_dict(), "opt": opt.state_dict(), "step": step, "scale_factor": scale},
        )

    bar = progress(total=tc.steps, initial=step, desc="diffusion", unit="step")
    inferer = None
    while step < tc.steps:
        batch = next(batches)
        guard.update(batch)
        if batch["image"] is None:
            continue
        x = batch["image"].to(device, non_blocking=True)  # (B, 1, D, H, W)
        context = batch["cond"].to(device, non_blocking=True)[:, None, :]  # (B, 1, 4)
        if scale <= 0:
            scale = latent_scale_factor(ae, x, device, precision)
            log.info("diffusion: latent scale factor %.4f (1 / std of the first batch's latents)", scale)
        if inferer is None:
            inferer = LatentDiffusionInferer(scheduler, scale_factor=scale)
        noise = torch.randn((x.shape[0], *shape), device=device)  # (B, C, d, h, w)
        t = torch.randint(0, scheduler.num_train_timesteps, (x.shape[0],), device=device).long()
        with autocast(device, precision):
            pred = inferer(
                inputs=x,
                autoencoder_model=ae,
                diffusion_model=unet,
                noise=noise,
                timesteps=t,
                condition=context,
                mode="crossattn",
            )  # (B, C, d, h, w)
            loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)

        if step % tc.log_every == 0 or step == tc.steps:
            value = loss.item()
            writer.add_scalar("diffusion/loss", value, step)
            log_metrics(run / "metrics.jsonl", {"stage": "diffusion", "step": step, "loss": value})
            bar.set_postfix(loss=f"{value:.4f}")
        if preview is not None and (step % tc.image_every == 0 or step == tc.steps):
            unet.eval()
            writer.add_image("diffusion/samples_across_age", axial_strip(preview(scale).cpu()), step, dataformats="HW")
            unet.train()
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            checkpoint()
    bar.close()
    unet.eval()
    if scale <= 0:  # zero diffusion steps: nothing measured, keep latents unscaled
        scale = 1.0
    return scale


def _noise_kwargs(cfg: LDMTrainConfig) -> dict:
    return asdict(cfg.noise)


def ages_preview_conditioning(cond: np.ndarray, n: int = 5) -> np.ndarray:
    """``(n, 4)`` conditioning: the median training subject, age swept from youngest to oldest (0 -> 1)."""
    base = np.median(cond, axis=0)
    rows = np.repeat(base[None], n, axis=0).astype(np.float32)
    rows[:, 1] = np.linspace(0.0, 1.0, n)
    return rows
