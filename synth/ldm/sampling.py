"""Sampling an LDM: conditioned noise -> DDIM in latent space -> decoded volume, and whole corpora on disk.

A corpus folder is laid out like the anatomy-model generator's (``images/<subject>.nii.gz`` +
``manifest.csv``), so the ``synthmri`` corpus reads either. Volume ``i`` of a run depends only on (seed, i):
its covariates and its starting noise come from ``SeedSequence([seed, i])`` and DDIM with eta = 0 adds no
further randomness. A rerun of the same command therefore skips the volumes already written and continues;
``n`` may grow between runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.inferers import LatentDiffusionInferer

from common.data import MANIFEST_COLUMNS, write_nifti
from common.errors import ConfigError
from common.io import atomic_write
from common.precision import autocast
from common.tb import progress
from synth.ldm.covariates import COVARIATES, draw_covariates, sex_label
from synth.ldm.model import LatentDiffusionModel
from synth.ldm.networks import sampling_scheduler

SETTINGS_FILE = "ldm_sample.json"
DATASET = "synth_ldm"


def initial_noise(latent_shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """``(B, C, d, h, w)`` standard normal, row ``b`` drawn from its own ``seeds[b]`` (batch-independent)."""
    return torch.stack(
        [torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


@torch.no_grad()
def generate(
    model: LatentDiffusionModel,
    conditioning: torch.Tensor,
    seeds: Sequence[int],
    ddim_steps: int | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> torch.Tensor:
    """Volumes ``(B, 1, D, H, W)`` in [0, 1] for ``conditioning`` ``(B, 4)`` (network units)."""
    device = torch.device(device)
    if conditioning.ndim != 2 or conditioning.shape != (len(seeds), len(COVARIATES)):
        raise ValueError(f"conditioning must be ({len(seeds)}, {len(COVARIATES)}), got {tuple(conditioning.shape)}")
    scheduler = sampling_scheduler(model.noise, _steps(ddim_steps, model))
    inferer = LatentDiffusionInferer(scheduler, scale_factor=model.scale_factor)
    noise = initial_noise(model.latent_shape, seeds).to(device)  # (B, C, d, h, w)
    context = conditioning.to(device=device, dtype=torch.float32)[:, None, :]  # (B, 1, 4)
    with autocast(device, precision):
        images = inferer.sample(
            input_noise=noise,
            autoencoder_model=model.autoencoder,
            diffusion_model=model.unet,
            scheduler=scheduler,
            conditioning=context,
            mode="crossattn",
            verbose=False,
        )
    return images.float().clamp_(0.0, 1.0)  # (B, 1, D, H, W)


def volume_seed(seed: int, index: int) -> int:
    """The seed of volume ``index`` in a run seeded ``seed`` (independent streams per volume)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def subject_id(index: int) -> str:
    return f"sub-{index:06d}"  # as the anatomy-model generator's corpora


def plan_row(model: LatentDiffusionModel, seed: int, index: int, fixed: Mapping[str, float]) -> dict:
    """The manifest row of volume ``index`` (covariates drawn or fixed), before it is generated.

    ``ventricle_volume`` / ``brain_volume`` are the requested (conditioning) values in the model's natural
    units, not measurements; ``cond_*`` are the same four covariates in the network's [0, 1] units.
    """
    natural = draw_covariates(
        np.random.default_rng(volume_seed(seed, index)), model.covariates, model.covariate_table, fixed
    )
    net = model.covariates.normalise(natural[None])[0]
    sid = subject_id(index)
    row = {
        "path": f"images/{sid}.nii.gz",
        "subject_id": sid,
        "session_id": "ses-1",
        "site": "synth",
        "dataset": DATASET,
        "age": round(float(natural[1]), 2),
        "sex": sex_label(natural[0]),
        "diagnosis": "CN",
        "seed": int(seed),
        "index": index,
        "ventricle_volume": float(natural[2]),
        "brain_volume": float(natural[3]),
    }
    row.update({f"cond_{c}": float(v) for c, v in zip(COVARIATES, net)})
    if len(set(model.spacing)) == 1:
        row["spacing"] = float(model.spacing[0])
    return row


def _check_settings(out: Path, settings: dict) -> None:
    path = out / SETTINGS_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        if changed:
            raise ConfigError(
                f"{out}: already holds samples made with other settings ({', '.join(changed)}: "
                f"{[previous.get(k) for k in changed]} then, {[settings[k] for k in changed]} now); rerun "
                "with the same settings to continue it, or choose another --out"
            )
    else:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(settings, indent=2))


def _write_manifest(out: Path, rows: list[dict]) -> Path:
    columns = list(MANIFEST_COLUMNS) + [c for c in rows[0] if c not in MANIFEST_COLUMNS] if rows else []
    with atomic_write(out / "manifest.csv") as tmp:
        pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False)
    return out / "manifest.csv"


def _steps(ddim_steps: int | None, model: LatentDiffusionModel) -> int:
    """The DDIM step count: the model's default when not given; 0 or fewer is an error, not the default."""
    if ddim_steps is None:
        return int(model.default_ddim_steps)
    if int(ddim_steps) < 1:
        raise ConfigError(f"--ddim-steps must be >= 1, got {ddim_steps}")
    return int(ddim_steps)


def sample_to_directory(
    model: LatentDiffusionModel,
    out: str | Path,
    n: int,
    seed: int = 0,
    fixed: Mapping[str, float] | None = None,
    ddim_steps: int | None = None,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    show_progress: bool = True,
) -> Path:
    """Write ``n`` volumes to ``out/images/`` and ``out/manifest.csv``, resuming a partial run.

    ``fixed`` maps covariate names (``sex``, ``age``, ``ventricle_volume``, ``brain_volume``) in natural units
    to the value every volume gets; the others are drawn per volume.
    """
    if n < 1 or batch_size < 1:
        raise ConfigError(f"n and batch size must be >= 1, got n={n}, batch size={batch_size}")
    fixed = {k: float(v) for k, v in (fixed or {}).items() if v is not None}
    unknown = set(fixed) - set(COVARIATES)
    if unknown:
        raise ConfigError(f"unknown covariate(s) {sorted(unknown)}; the LDM is conditioned on {list(COVARIATES)}")
    ddim_steps = _steps(ddim_steps, model)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out is a file, not a corpus folder; choose a folder path")
    (out / "images").mkdir(parents=True, exist_ok=True)
    _check_settings(
        out,
        {
            "model": model.source,
            "seed": int(seed),
            "fixed": fixed,
            "ddim_steps": ddim_steps,
            "precision": precision,
        },
    )

    rows = [plan_row(model, seed, i, fixed) for i in range(n)]
    pending = [i for i in range(n) if not (out / rows[i]["path"]).is_file()]
    device = torch.device(device)
    model.to(device).eval()
    bar = progress(total=n, initial=n - len(pending), unit="vol", desc="ldm-sample", disable=not show_progress)
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        cond = torch.tensor([[rows[i][f"cond_{c}"] for c in COVARIATES] for i in batch])  # (B, 4)
        seeds = [volume_seed(seed, i) for i in batch]
        images = generate(model, cond, seeds, ddim_steps, device, precision)
        for i, image in zip(batch, images.cpu()):
            write_nifti(image, out / rows[i]["path"], spacing=model.spacing)
        bar.update(len(batch))
        _write_manifest(out, [r for r in rows if (out / r["path"]).is_file()])
    bar.close()
    return _write_manifest(out, rows)
