"""A trained LDM as one object, saved as a model folder and loaded from it or from the public MONAI bundle.

Model folder (what ``ldm-train`` exports to ``RUN/export/``)::

    ldm.json                 MONAI kwargs of the networks, noise schedule, scale factor, geometry, covariates
    autoencoder.safetensors  AutoencoderKL state dict
    unet.safetensors         DiffusionModelUNet state dict
    covariates.csv           the training covariates (natural units), from which unspecified ones are drawn

:func:`load_model` also takes a training run folder (reads its ``export/``) or a MONAI bundle folder
(``configs/inference.json`` + ``models/*.pt``, see :mod:`synth.ldm.bundle`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from monai.networks.nets import AutoencoderKL
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.checkpoint import load_state_dict_strict
from common.errors import CheckpointError
from common.io import atomic_write
from synth.ldm.covariates import COVARIATES, CovariateSpace
from synth.ldm.networks import ConditionedUNet, build_autoencoder, build_unet, downsampling

FORMAT = "neurotransfer-ldm/1"


@dataclass
class LatentDiffusionModel:
    """Autoencoder + conditioned UNet + what sampling needs to turn noise into a NIfTI volume."""

    autoencoder: AutoencoderKL
    unet: ConditionedUNet
    autoencoder_kwargs: dict[str, Any]  # rebuilds the autoencoder (MONAI kwargs)
    unet_kwargs: dict[str, Any]  # rebuilds the UNet (MONAI kwargs)
    noise: dict[str, Any]  # DDPM/DDIM scheduler kwargs
    scale_factor: float  # latents were multiplied by this for diffusion
    image_shape: tuple[int, int, int]  # (D, H, W) of a decoded volume
    spacing: tuple[float, float, float]  # mm
    covariates: CovariateSpace  # natural units -> network's [0, 1]
    covariate_table: pd.DataFrame | None = None  # training covariates (natural units), None for the bundle
    default_ddim_steps: int = 50
    source: str = ""  # where it was loaded from (goes into sample manifests)
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (config, steps trained ...)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(C, d, h, w)`` of the diffusion's latent."""
        f = downsampling(self.autoencoder_kwargs)
        return (int(self.autoencoder_kwargs["latent_channels"]), *(s // f for s in self.image_shape))

    def to(self, device: str | torch.device) -> LatentDiffusionModel:
        self.autoencoder.to(device)
        self.unet.to(device)
        return self

    def eval(self) -> LatentDiffusionModel:
        self.autoencoder.eval()
        self.unet.eval()
        return self

    def save(self, folder: str | Path) -> Path:
        """Write the model folder (each file atomically); returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "autoencoder": self.autoencoder_kwargs,
            "unet": self.unet_kwargs,
            "conditioning": {"concat": self.unet.concat, "crossattn": self.unet.crossattn},
            "noise": self.noise,
            "scale_factor": self.scale_factor,
            "image_shape": list(self.image_shape),
            "spacing": list(self.spacing),
            "covariates": self.covariates.to_dict(),
            "default_ddim_steps": self.default_ddim_steps,
            "extra": self.extra,
        }
        for name, net in (("autoencoder", self.autoencoder), ("unet", self.unet.unet)):
            tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}
            with atomic_write(folder / f"{name}.safetensors") as tmp:
                save_file(tensors, tmp)
        if self.covariate_table is not None:
            with atomic_write(folder / "covariates.csv") as tmp:
                self.covariate_table.to_csv(tmp, index=False)
        with atomic_write(folder / "ldm.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=2))
        return folder


def assemble(
    autoencoder_kwargs: dict, unet_kwargs: dict, concat: bool, where: str
) -> tuple[AutoencoderKL, ConditionedUNet]:
    """Build the two networks (random weights) and check that the UNet's channels fit the latent."""
    ae = build_autoencoder(autoencoder_kwargs, f"{where} autoencoder")
    unet = build_unet(unet_kwargs, f"{where} unet")
    n_cond = len(COVARIATES)
    expected_in = int(autoencoder_kwargs["latent_channels"]) + (n_cond if concat else 0)
    if int(unet_kwargs["in_channels"]) != expected_in or int(unet_kwargs["out_channels"]) != int(
        autoencoder_kwargs["latent_channels"]
    ):
        raise CheckpointError(
            f"{where}: the UNet takes {unet_kwargs['in_channels']} channels and returns "
            f"{unet_kwargs['out_channels']}, but the latent has {autoencoder_kwargs['latent_channels']} "
            f"channels{' plus ' + str(n_cond) + ' concatenated covariates' if concat else ''}"
        )
    if unet_kwargs.get("with_conditioning") and int(unet_kwargs.get("cross_attention_dim") or 0) != n_cond:
        raise CheckpointError(
            f"{where}: cross_attention_dim must be {n_cond} (one per covariate), "
            f"got {unet_kwargs.get('cross_attention_dim')}"
        )
    return ae, ConditionedUNet(unet, n_cond=n_cond, concat=concat)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the model folder")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def load_model_folder(folder: str | Path) -> LatentDiffusionModel:
    """Load a model folder written by :meth:`LatentDiffusionModel.save`."""
    folder = Path(folder)
    meta_path = folder / "ldm.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: cannot read the model description ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    ae, unet = assemble(meta["autoencoder"], meta["unet"], bool(meta["conditioning"]["concat"]), str(folder))
    load_state_dict_strict(
        ae, _read_safetensors(folder / "autoencoder.safetensors"), folder / "autoencoder.safetensors"
    )
    load_state_dict_strict(unet.unet, _read_safetensors(folder / "unet.safetensors"), folder / "unet.safetensors")
    table = None
    if (folder / "covariates.csv").is_file():
        table = pd.read_csv(folder / "covariates.csv")
        missing = [c for c in COVARIATES if c not in table.columns]
        if missing:
            raise CheckpointError(f"{folder / 'covariates.csv'}: missing column(s) {', '.join(missing)}")
    return LatentDiffusionModel(
        autoencoder=ae,
        unet=unet,
        autoencoder_kwargs=meta["autoencoder"],
        unet_kwargs=meta["unet"],
        noise=meta["noise"],
        scale_factor=float(meta["scale_factor"]),
        image_shape=tuple(int(s) for s in meta["image_shape"]),
        spacing=tuple(float(s) for s in meta["spacing"]),
        covariates=CovariateSpace.from_dict(meta["covariates"]),
        covariate_table=table,
        default_ddim_steps=int(meta.get("default_ddim_steps", 50)),
        source=str(folder.resolve()),
        extra=meta.get("extra", {}),
    ).eval()
