"""MONAI's generative networks and schedulers as the LDM uses them, and the covariate conditioning wrapper.

Nothing here re-implements MONAI: ``AutoencoderKL`` and ``DiffusionModelUNet`` are built from their keyword
arguments, and ``DDPMScheduler`` / ``DDIMScheduler`` from one shared noise schedule. The only addition is
:class:`ConditionedUNet`, which feeds the covariates the way the public brain LDM does: as the cross-attention
context *and* broadcast as extra input channels (MONAI's inferers offer one or the other, not both).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from common.errors import ConfigError


def _build(cls: type, kwargs: Mapping[str, Any], where: str) -> nn.Module:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: cannot build {cls.__name__} from {dict(kwargs)} ({e})") from e


def build_autoencoder(kwargs: Mapping[str, Any], where: str = "autoencoder") -> AutoencoderKL:
    """``AutoencoderKL(**kwargs)``; a bad argument is a ``ConfigError`` naming ``where``."""
    return _build(AutoencoderKL, kwargs, where)


def build_unet(kwargs: Mapping[str, Any], where: str = "unet") -> DiffusionModelUNet:
    """``DiffusionModelUNet(**kwargs)``; a bad argument is a ``ConfigError`` naming ``where``."""
    return _build(DiffusionModelUNet, kwargs, where)


def downsampling(autoencoder_kwargs: Mapping[str, Any]) -> int:
    """How much smaller than the image each latent axis is: one halving per level after the first."""
    return 2 ** (len(autoencoder_kwargs["channels"]) - 1)


class ConditionedUNet(nn.Module):
    """A ``DiffusionModelUNet`` fed covariates ``(B, 1, K)`` as context, as input channels, or both.

    Call it as MONAI's inferers call a UNet (``x, timesteps, context``) with ``mode="crossattn"``; the concat
    part happens here. It adds no parameters: save and load ``.unet``, whose keys are MONAI's own layout.
    """

    def __init__(self, unet: DiffusionModelUNet, n_cond: int, concat: bool):
        super().__init__()
        self.unet = unet
        self.n_cond = n_cond
        self.concat = concat
        self.crossattn = bool(unet.with_conditioning)
        if not (self.concat or self.crossattn):
            raise ConfigError("the diffusion UNet takes no conditioning: set unet.conditioning")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x (B, C, d, h, w), timesteps (B,) or (1,), context (B, 1, K) in [0, 1]
        if context.ndim != 3 or context.shape[-1] != self.n_cond:
            raise ValueError(f"conditioning must be (B, 1, {self.n_cond}), got {tuple(context.shape)}")
        if self.concat:
            planes = context[:, 0, :, None, None, None].expand(-1, -1, *x.shape[2:])  # (B, K, d, h, w)
            x = torch.cat([x, planes.to(x.dtype)], dim=1)  # (B, C + K, d, h, w)
        return self.unet(x, timesteps=timesteps, context=context if self.crossattn else None)


def training_scheduler(noise: Mapping[str, Any]) -> DDPMScheduler:
    """The forward (noising) process used in training."""
    return DDPMScheduler(**noise)


def sampling_scheduler(noise: Mapping[str, Any], steps: int) -> DDIMScheduler:
    """A DDIM sampler over the same noise schedule, ``steps`` denoising steps (deterministic: eta = 0)."""
    if not 1 <= steps <= int(noise.get("num_train_timesteps", 1000)):
        raise ConfigError(f"DDIM steps must lie in [1, {noise.get('num_train_timesteps', 1000)}], got {steps}")
    scheduler = DDIMScheduler(**noise)
    scheduler.set_timesteps(num_inference_steps=steps)
    return scheduler
