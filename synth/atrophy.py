"""Covariate-driven atrophy: ventricular enlargement, hippocampal / putamen / midbrain shrinkage, cortical
thinning.

Region changes are displacement fields: for a region mask ``m`` smoothed by ``BASIS_SMOOTH_MM`` (sigma), ``g =
grad(m) / max|grad(m)|`` points into the region with unit peak at its boundary. Reading the template at ``q +
a * g`` grows the region's boundary outward by about ``a`` mm (ventricles); at ``q - a * g`` it moves inward
(hippocampi, putamen, midbrain). The slope of ``g`` across the boundary is at most ``1 / (sigma * sqrt(e))``,
so the warp cannot fold while ``a < sigma * sqrt(e)`` (~4.9 mm): effects are capped at
``AtrophyConfig.max_mm``. Cortical thinning is not a warp: a share of the grey matter that touches sulcal CSF
becomes CSF (``anatomy.SOURCE_CHANNELS``), uniformly (ageing) and extra in the AD pattern's cortex (temporal
lobes, or parietal and occipital under ``ad_pattern: posterior``).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage as ndi

from synth.anatomy import BOX_MAX_MM, BOX_MIN_MM, load_templates
from synth.config import AtrophyConfig
from synth.deformation import Lattice
from synth.regions import HIPPOCAMPI, MIDBRAIN, PUTAMEN, VENTRICLES

BASIS_REGIONS = {"ventricle": VENTRICLES, "hippocampus": HIPPOCAMPI, "putamen": PUTAMEN, "midbrain": MIDBRAIN}
BASIS_SMOOTH_MM = 3.0  # falloff of each region's field: displacement reaches ~1 smoothing width past the boundary
# +1: the region grows (the template is read from inside it); -1: it shrinks.
DIRECTION = {"ventricle": 1.0, "hippocampus": -1.0, "putamen": -1.0, "midbrain": -1.0}


@dataclass(frozen=True)
class Effects:
    """One subject's atrophy, in the units of ``AtrophyConfig`` (mm of boundary movement, share of cortex)."""

    ageing: float  # the age factor in [0, 1] the ageing effects were scaled by
    ventricle_mm: float
    hippocampus_mm: float
    putamen_mm: float
    midbrain_mm: float
    cortical_thinning: float
    pattern_thinning: float  # extra thinning of the AD pattern's cortex (AtrophyConfig.ad_pattern)

    def as_dict(self) -> dict[str, float]:
        return {f"effect_{k}": round(float(v), 5) for k, v in asdict(self).items()}


def age_factor(cfg: AtrophyConfig, age: float) -> float:
    """0 at ``age_onset``, 1 at ``age_max``: a power (``power``) or two straight pieces meeting at ``age_knee``
    at ``age_knee_share`` (``late``); either way old age changes faster."""
    if cfg.age_curve == "late":
        early = np.clip((age - cfg.age_onset) / (cfg.age_knee - cfg.age_onset), 0.0, 1.0)
        late = np.clip((age - cfg.age_knee) / (cfg.age_max - cfg.age_knee), 0.0, 1.0)
        return float(cfg.age_knee_share * early + (1.0 - cfg.age_knee_share) * late)
    t = (age - cfg.age_onset) / max(cfg.age_max - cfg.age_onset, 1e-6)
    return float(np.clip(t, 0.0, 1.0) ** cfg.age_exponent)


def sample_effects(cfg: AtrophyConfig, age: float, diagnosis: str, rng: np.random.Generator) -> Effects:
    """The subject's effects: ageing + disease, each scaled by an individual log-normal factor, plus the
    subject's own hippocampal and ventricular boundary offsets and AD-pattern thinning (drawn after the factors,
    so zero sds leave every other draw, and so every existing subject, as it was)."""
    f = age_factor(cfg, age)
    ad, pd = float(diagnosis == "AD"), float(diagnosis == "PD")
    noise = np.exp(rng.normal(0.0, cfg.individual_sd, 6))
    hippocampus_own, ventricle_own = rng.normal(0.0, 1.0, 2) * (cfg.hippocampus_sd_mm, cfg.ventricle_sd_mm)
    pattern_own = abs(rng.normal(0.0, cfg.pattern_sd))  # thinner than the template only: a half-normal
    thin = cfg.cortical_thinning_age * f + cfg.cortical_thinning_ad * ad
    mm = lambda value: float(np.clip(value, 0.0, cfg.max_mm))
    signed_mm = lambda value: float(np.clip(value, -cfg.max_mm, cfg.max_mm))  # an own offset may enlarge
    # the ventricles move from their young-adult boundary (may lie inside the template's) to the age_max one
    ageing = cfg.ventricle_young_mm + (cfg.ventricle_age_mm - cfg.ventricle_young_mm) * f
    ventricles = ageing + cfg.ventricle_ad_mm * ad + cfg.ventricle_pd_mm * pd
    hippocampus = (cfg.hippocampus_age_mm * f + cfg.hippocampus_ad_mm * ad) * noise[1]
    return Effects(
        ageing=f,
        ventricle_mm=signed_mm(ventricles * noise[0] + ventricle_own),
        hippocampus_mm=signed_mm(hippocampus + hippocampus_own),
        putamen_mm=mm(cfg.putamen_pd_mm * pd * noise[2]),
        midbrain_mm=mm(cfg.midbrain_pd_mm * pd * noise[3]),
        cortical_thinning=float(np.clip(thin * noise[4], 0.0, 0.9)),
        pattern_thinning=float(np.clip(cfg.pattern_thinning_ad * ad * noise[5] + pattern_own, 0.0, 0.9)),
    )


def template_lattice(lattice_mm: float) -> Lattice:
    """A lattice over the template box (anatomy fields live on it)."""
    return Lattice.spanning(BOX_MIN_MM, BOX_MAX_MM, lattice_mm)


@functools.lru_cache(maxsize=2)
def atrophy_basis(lattice_mm: float) -> dict[str, torch.Tensor]:
    """Unit-peak region fields ``g`` (3, d, h, w) on ``template_lattice(lattice_mm)``, signed by ``DIRECTION``."""
    t = load_templates()
    lattice = template_lattice(lattice_mm)
    # lattice points in template voxel units (1 mm, origin t.origin_mm)
    coords = [(lattice.origin[i] + lattice.step[i] * np.arange(lattice.size[i]) - t.origin_mm[i]) for i in range(3)]
    coords = np.meshgrid(*coords, indexing="ij")
    basis = {}
    for name, labels in BASIS_REGIONS.items():
        smooth = ndi.gaussian_filter(np.isin(t.regions, labels).astype(np.float32), BASIS_SMOOTH_MM)
        grad = np.stack([ndi.map_coordinates(g, coords, order=1, mode="nearest") for g in np.gradient(smooth)])
        grad /= max(float(np.sqrt((grad**2).sum(0)).max()), 1e-8)
        basis[name] = torch.from_numpy((DIRECTION[name] * grad).astype(np.float32))
    return basis


def atrophy_displacement(effects: Effects, basis: dict[str, torch.Tensor]) -> torch.Tensor:
    """The subject's atrophy displacement (3, d, h, w) mm: the region fields weighted by its effects."""
    amount = {
        "ventricle": effects.ventricle_mm,
        "hippocampus": effects.hippocampus_mm,
        "putamen": effects.putamen_mm,
        "midbrain": effects.midbrain_mm,
    }
    return sum(float(amount[name]) * field for name, field in basis.items())
