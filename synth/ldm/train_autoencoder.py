"""Stage 1 of the LDM: the KL-regularised autoencoder (L1 reconstruction + KL, optional PatchGAN term).

Rombach et al. 2022 (latent diffusion) and Pinaya et al. 2022 (its 3D brain version). The perceptual loss of
those papers is left out: it needs downloaded network weights, which this project never fetches at run time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import AutoencoderKL, PatchDiscriminator

from common.bf16_check import faulty_convolutions, run_in_fp32
from common.precision import autocast
from common.tb import RankZeroWriter, progress
from synth.ldm.config import LDMTrainConfig
from synth.ldm.figures import axial_strip
from synth.ldm.run_state import load_state, log_metrics, save_state
from synth.ldm.training_data import BadSampleGuard

log = logging.getLogger(__name__)


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)), summed over the latent, mean over the batch (Kingma & Welling 2014)."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1.0)  # (B, C, d, h, w)
    return kl.flatten(1).sum(1).mean()


def train_autoencoder(
    ae: AutoencoderKL,
    batches: Iterator[dict],
    guard: BadSampleGuard,
    cfg: LDMTrainConfig,
    run: Path,
    writer: RankZeroWriter,
    device: torch.device,
    precision: str,
) -> AutoencoderKL:
    """Train (or resume, from ``run/checkpoints/autoencoder.pt``) to ``cfg.train_autoencoder.steps``."""
    tc = cfg.train_autoencoder
    ckpt = run / "checkpoints" / "autoencoder.pt"
    ae.to(device).train()
    opt = torch.optim.Adam(ae.parameters(), lr=tc.lr)
    disc = disc_opt = None
    adv = PatchAdversarialLoss(criterion="least_squares")
    if tc.adv_weight > 0:
        disc = PatchDiscriminator(
            spatial_dims=3,
            num_layers_d=tc.disc_layers,
            channels=tc.disc_channels,
            in_channels=1,
            out_channels=1,
        ).to(device)
        if precision == "bf16":  # its convolutions' bf16 kernels are checked as the autoencoder's were
            example = torch.rand(2, 1, *cfg.data.shape, device=device, generator=torch.Generator(device).manual_seed(0))
            run_in_fp32(disc, faulty_convolutions(disc, lambda d: d(example)))
        disc_opt = torch.optim.Adam(disc.parameters(), lr=tc.lr)

    step = 0
    state = load_state(ckpt)
    if state is not None:
        ae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if disc is not None and "disc" in state:
            disc.load_state_dict(state["disc"])
            disc_opt.load_state_dict(state["disc_opt"])
        step = int(state["step"])
        log.info("autoencoder: resumed at step %d from %s", step, ckpt)

    def checkpoint() -> None:
        s = {"model": ae.state_dict(), "opt": opt.state_dict(), "step": step}
        if disc is not None:
            s.update(disc=disc.state_dict(), disc_opt=disc_opt.state_dict())
        save_state(ckpt, s)

    bar = progress(total=tc.steps, initial=step, desc="autoencoder", unit="step")
    while step < tc.steps:
        batch = next(batches)
        guard.update(batch)
        if batch["image"] is None:
            continue
        x = batch["image"].to(device, non_blocking=True)  # (B, 1, D, H, W)
        use_adv = disc is not None and step >= tc.adv_start
        with autocast(device, precision):
            recon, z_mu, z_sigma = ae(x)  # (B, 1, D, H, W), (B, C, d, h, w) x 2
            l1 = F.l1_loss(recon.float(), x)
            kl = kl_loss(z_mu.float(), z_sigma.float())
            loss = l1 + tc.kl_weight * kl
            if use_adv:
                g_adv = adv(disc(recon.contiguous().float())[-1], target_is_real=True, for_discriminator=False)
                loss = loss + tc.adv_weight * g_adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if use_adv:
            with autocast(device, precision):
                fake = adv(disc(recon.detach().float())[-1], target_is_real=False, for_discriminator=True)
                real = adv(disc(x)[-1], target_is_real=True, for_discriminator=True)
                d_loss = tc.adv_weight * 0.5 * (fake + real)
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
        step += 1
        bar.update(1)

        if step % tc.log_every == 0 or step == tc.steps:
            record = {
                "stage": "autoencoder",
                "step": step,
                "loss": loss.item(),
                "l1": l1.item(),
                "kl": kl.item(),
            }
            if use_adv:
                record["d_loss"] = d_loss.item()
            for k, v in record.items():
                if k not in ("stage", "step"):
                    writer.add_scalar(f"autoencoder/{k}", v, step)
            log_metrics(run / "metrics.jsonl", record)
            bar.set_postfix(l1=f"{record['l1']:.4f}")
        if step % tc.image_every == 0 or step == tc.steps:
            both = torch.cat([x[:4].detach(), recon[:4].detach().float()], dim=0).cpu()  # inputs, then recons
            writer.add_image("autoencoder/input_then_reconstruction", axial_strip(both), step, dataformats="HW")
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            checkpoint()
    bar.close()
    if state is None and tc.steps == 0:
        checkpoint()
    return ae.eval()
