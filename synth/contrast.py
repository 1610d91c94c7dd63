"""Tissue intensities and partial-volume image formation in template space.

The image before artefacts is linear in the tissue probabilities, ``I = sum_k p_k mu_k`` (partial-volume
mixing), so it is formed on the template grid first and warped once: one channel through ``grid_sample``
instead of five.
"""

from __future__ import annotations

import numpy as np
import torch

from synth.atrophy import Effects
from synth.config import ContrastConfig

TISSUES = ("csf", "gm", "wm")


def sample_means(
    cfg: ContrastConfig,
    contrast: str,
    rng: np.random.Generator,
    sd: float | None = None,
    around: np.ndarray | None = None,
) -> np.ndarray:
    """Tissue means (CSF, GM, WM) on [0, 1].

    ``t1``: the config's means (or ``around``) shifted by ``sd`` (default: the site sd), then forced into
    the T1-weighted order WM > GM > CSF with ``min_gap``. ``random``: uniform in the config's range when
    ``around`` is None (a new contrast), else ``around`` shifted by ``sd`` (a subject keeps its site's
    contrast).
    """
    if contrast == "t1":
        base = np.array([cfg.t1_csf, cfg.t1_gm, cfg.t1_wm]) if around is None else np.asarray(around)
        means = base + rng.normal(0.0, cfg.t1_site_sd if sd is None else sd, 3)
        means[0] = np.clip(means[0], 0.02, 1.0 - 2 * cfg.min_gap)
        means[1] = np.clip(means[1], means[0] + cfg.min_gap, 1.0 - cfg.min_gap)
        means[2] = np.clip(means[2], means[1] + cfg.min_gap, 1.0)
        return means
    if around is None:
        return rng.uniform(cfg.random_low, cfg.random_high, 3)
    return np.clip(np.asarray(around) + rng.normal(0.0, sd or 0.0, 3), cfg.random_low, cfg.random_high)


def source_weights(means: np.ndarray, effects: Effects) -> torch.Tensor:
    """Weights (5,) of ``anatomy.SOURCE_CHANNELS``: tissue means; cortical thinning as GM -> CSF intensity."""
    csf, gm, wm = (float(m) for m in means)
    shift = csf - gm  # a thinned voxel's grey matter now reads as CSF
    thin_global = effects.cortical_thinning
    thin_pattern = min(effects.pattern_thinning, 1.0 - thin_global)
    return torch.tensor([csf, gm, wm, shift * thin_global, shift * thin_pattern], dtype=torch.float32)


def form_image(source: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(5, X, Y, Z)`` tissue channels, ``(5,)`` or ``(B, 5)`` weights -> ``(B, 1, X, Y, Z)`` partial-volume
    images (B = 1 for one weight vector)."""
    c, *spatial = source.shape
    weights = weights.reshape(-1, c)  # (B, 5)
    return (weights @ source.reshape(c, -1)).reshape(-1, 1, *spatial)  # one BLAS pass over the channels
