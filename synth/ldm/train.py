"""``ldm-train``: the autoencoder, then the conditional diffusion UNet, then a model folder ``RUN/export/``.

Run folder: ``config.yaml`` (resolved), ``tb/`` (TensorBoard: losses, reconstructions, samples across ages),
``checkpoints/{autoencoder,diffusion}.pt`` (resume state), ``metrics.jsonl``, ``export/`` (see
:mod:`synth.ldm.model`). A plain single-process loop: the LDM trains on one device.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import common
from common.bf16_check import train_precision
from common.config import save_config
from common.data import read_manifest
from common.distributed import seed_everything
from common.errors import ConfigError
from common.io import file_hash
from common.precision import resolve_device, resolve_precision
from common.tb import RankZeroWriter
from synth.ldm.config import LDMTrainConfig, latent_shape
from synth.ldm.covariates import COVARIATES, CovariateSpace, LabelScheme, covariate_table
from synth.ldm.model import LatentDiffusionModel, assemble
from synth.ldm.sampling import generate
from synth.ldm.train_autoencoder import kl_loss, train_autoencoder
from synth.ldm.train_diffusion import ages_preview_conditioning, train_diffusion
from synth.ldm.training_data import BadSampleGuard, ConditionedVolumes, endless_batches

log = logging.getLogger(__name__)


def train_ldm(cfg: LDMTrainConfig, out: str | Path, resume: bool = False) -> Path:
    """Train both stages into the run folder ``out`` (continuing its checkpoints if ``resume``).

    Returns the export folder, loadable with :func:`synth.ldm.model.load_model`.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out is a file, not a run folder; choose a folder path")
    if not resume and any((out / "checkpoints").glob("*.pt")):
        raise ConfigError(f"{out}: already holds a training run; pass --resume to continue it, or choose a new --out")
    if not cfg.data.manifest:
        raise ConfigError("data.manifest is not set: pass --manifest CSV (or data.manifest=CSV)")
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device, key="precision")  # a wrong word fails before anything is written
    seed_everything(cfg.seed)
    save_config(cfg, out / "config.yaml")

    manifest = Path(cfg.data.manifest)
    df = read_manifest(manifest, required=("path", "subject_id", "age", "sex"))
    scheme = LabelScheme(tuple(cfg.data.ventricle_labels), tuple(cfg.data.non_brain_labels))
    table = covariate_table(df, manifest, scheme, cfg.data.label_column)  # (N, 4) natural units
    space = CovariateSpace.fit(table)
    cond = space.normalise(table[list(COVARIATES)].to_numpy())  # (N, 4) in [0, 1]
    dataset = ConditionedVolumes(df["path"].tolist(), cond, cfg.data.preprocess())
    guard = BadSampleGuard(cfg.data.max_bad_fraction, len(dataset), str(manifest))

    ae_kwargs = cfg.autoencoder.kwargs()
    unet_kwargs = cfg.unet.kwargs(cfg.autoencoder.latent_channels, len(COVARIATES))
    ae, unet = assemble(ae_kwargs, unet_kwargs, cfg.unet.conditioning in ("concat", "both"), "config")
    model = LatentDiffusionModel(
        autoencoder=ae,
        unet=unet,
        autoencoder_kwargs=ae_kwargs,
        unet_kwargs=unet_kwargs,
        noise=asdict(cfg.noise),
        scale_factor=1.0,
        image_shape=tuple(cfg.data.shape),
        spacing=tuple(cfg.data.spacing),
        covariates=space,
        covariate_table=table,
    )

    precision = checked_precision(cfg, ae, unet, device)
    preview_cond = torch.from_numpy(ages_preview_conditioning(cond))  # (5, 4): age swept, rest median

    def preview(scale: float) -> torch.Tensor:
        model.scale_factor = scale
        seeds = [cfg.seed] * len(preview_cond)  # one noise for all: the strip shows what age alone changes
        return generate(model, preview_cond, seeds, cfg.train_diffusion.image_ddim_steps, device, precision)

    with RankZeroWriter(out / "tb") as writer:
        batches = endless_batches(dataset, cfg.train_autoencoder.batch_size, cfg.data.num_workers, cfg.seed)
        train_autoencoder(ae, batches, guard, cfg, out, writer, device, precision)
        batches.close()  # shuts its DataLoader workers down
        batches = endless_batches(dataset, cfg.train_diffusion.batch_size, cfg.data.num_workers, cfg.seed + 1)
        scale = train_diffusion(ae, unet, batches, guard, cfg, out, writer, device, precision, preview)
        batches.close()

    model.scale_factor = scale
    model.extra = {
        "config": OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
        "manifest": str(manifest.resolve()),
        "manifest_hash": file_hash(manifest),
        "steps": {"autoencoder": cfg.train_autoencoder.steps, "diffusion": cfg.train_diffusion.steps},
        "package_version": common.__version__,
    }
    export = model.save(out / "export")
    log.info("LDM exported to %s", export)
    return export


def checked_precision(cfg: LDMTrainConfig, ae, unet, device: torch.device) -> str:
    """``cfg.precision`` for both networks (``common.bf16_check.train_precision``), checked on random data
    shaped like the run's: where they would compute in bf16, convolutions whose bf16 kernel fails move to fp32,
    and ``auto`` keeps bf16 only if both networks' bf16 steps match fp32."""
    g = torch.Generator().manual_seed(cfg.seed)
    n = 2  # BatchNorm-free networks: two samples show the kernels' shapes
    x = torch.rand(n, 1, *cfg.data.shape, generator=g).to(device)  # (n, 1, D, H, W)
    z = torch.randn(n, *latent_shape(cfg), generator=g).to(device)  # (n, C, d, h, w)
    t = torch.randint(0, cfg.noise.num_train_timesteps, (n,), generator=g).to(device)
    context = torch.rand(n, 1, len(COVARIATES), generator=g).to(device)

    def ae_loss(m) -> torch.Tensor:
        recon, mu, sigma = m(x)
        return F.l1_loss(recon.float(), x) + cfg.train_autoencoder.kl_weight * kl_loss(mu.float(), sigma.float())

    precision = cfg.precision
    for name, net, loss in (
        ("autoencoder", ae.to(device), ae_loss),
        ("diffusion UNet", unet.to(device), lambda m: F.mse_loss(m(z, timesteps=t, context=context).float(), z)),
    ):
        chosen, why = train_precision(cfg.precision, net, loss, device, key="precision")
        log.info("precision %s, %s -> %s: %s", cfg.precision, name, chosen, why)
        if chosen == "fp32":
            precision = "fp32"
    return "fp32" if precision == "fp32" else "bf16"
