"""Two random 3D views of a subject for the contrastive objectives, built from MONAI transforms.

SimCLR's recipe moved to 3D MRI: random resized crop, flips, affine, intensity (contrast, scale, shift),
noise, blur and an MRI bias field. Each view is seeded from the item's generator, so a resumed stream repeats
it. ``objective.contrastive.views`` says what the two views start from: ``augment``, one volume twice;
``rescan``, two renderings of one subject by two scanners (synth's, ``Source.pair``): a positive pair that shares
the anatomy and differs in everything a scanner decides, before any augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureType,
    RandAdjustContrast,
    RandAffine,
    RandBiasField,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandScaleCrop,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
)

from common.errors import ConfigError
from pretrain.objectives import OBJECTIVES

VIEWS = ("augment", "rescan")  # objective.contrastive.views


def rescan_views(cfg) -> bool:
    """Whether the run's (``PretrainConfig``) objective takes views, made from two renderings of a subject."""
    return cfg.objective.contrastive.views == "rescan" and OBJECTIVES[cfg.objective.name].cls.needs_views


def build_view_transform(cfg, input_size: Sequence[int]) -> Compose:
    """The random view pipeline for ``cfg`` (a ``ContrastiveConfig``): (1, D, H, W) -> (1, *input_size)."""
    lo, hi = cfg.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"objective.contrastive.crop_scale must be (low, high) in (0, 1], got {list(cfg.crop_scale)}")
    size = tuple(int(s) for s in input_size)
    return Compose(
        [
            RandScaleCrop(roi_scale=lo, max_roi_scale=hi, random_center=True, random_size=True),
            Resize(spatial_size=size, mode="trilinear"),  # the "resized" of random resized crop
            *[RandFlip(prob=0.5, spatial_axis=int(axis)) for axis in cfg.flip_axes],
            RandAffine(
                prob=cfg.affine_prob,
                rotate_range=(0.26, 0.26, 0.26),
                scale_range=(0.1, 0.1, 0.1),
                padding_mode="zeros",
            ),  # ±15°, ±10 %
            RandBiasField(prob=cfg.bias_field_prob, coeff_range=(0.0, 0.3)),
            RandAdjustContrast(prob=cfg.intensity_prob, gamma=(0.7, 1.5)),
            RandScaleIntensity(factors=0.2, prob=cfg.intensity_prob),
            RandShiftIntensity(offsets=0.1, prob=cfg.intensity_prob),
            RandGaussianSmooth(sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), sigma_z=(0.25, 1.0), prob=cfg.blur_prob),
            RandGaussianNoise(prob=cfg.noise_prob, std=0.05),
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


class TwoViews:
    """``(volume, rng) -> {"view1", "view2"}``: two independent draws of the view pipeline, of one volume or,
    given two (a subject's renderings, when ``rescan``), one of each."""

    def __init__(self, cfg, input_size: Sequence[int]):
        self.transform = build_view_transform(cfg, input_size)
        self.rescan = cfg.views == "rescan"  # the stream hands two renderings of a subject (Source.pair)

    def __call__(
        self, volume: torch.Tensor | tuple[torch.Tensor, torch.Tensor], rng: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        volumes = volume if isinstance(volume, tuple) else (volume, volume)
        views = {}
        for key, source in zip(("view1", "view2"), volumes):
            self.transform.set_random_state(seed=int(rng.integers(2**31)))
            views[key] = torch.as_tensor(self.transform(source)).contiguous()
        return views
