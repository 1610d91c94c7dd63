"""The anatomy model: nilearn's bundled MNI152 2009 templates as tissue probabilities, regions and output
geometry.

The templates are the 1 mm ICBM152 2009a (symmetric) T1, grey-matter and white-matter maps that ship inside
nilearn (``nilearn/datasets/data``, the files ``nilearn.datasets.load_mni152_*_template`` read), opened here
with nibabel straight from the installed package: no download, and no import of scikit-learn. CSF is derived:
brain mask (template T1 > 0, the skull-stripped brain with its CSF) minus GM minus WM. Everything here is
computed once per process and spacing (cached) so per-subject work is only the warp and the image formation.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage as ndi

from synth.config import AD_PATTERNS
from synth.regions import VENTRICLES, build_regions, posterior_weight, temporal_weight

# The template box the generator samples from (MNI mm, inclusive): the brain plus a margin.
BOX_MIN_MM = np.array([-80.0, -116.0, -72.0])
BOX_MAX_MM = np.array([80.0, 82.0, 90.0])
# Centre of the brain's bounding box in MNI mm; the output field of view is centred on it.
BRAIN_CENTRE_MM = np.array([0.0, -17.0, 5.0])
# gm_at_csf_ad: the CSF-facing grey matter of the AD pattern's lobes (AtrophyConfig.ad_pattern)
SOURCE_CHANNELS = ("csf", "gm", "wm", "gm_at_csf", "gm_at_csf_ad")


@dataclass(frozen=True)
class Templates:
    """1 mm template maps cropped to the box; arrays (X, Y, Z) float32 unless noted."""

    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray  # soft brain mask (partial volume at the brain's outer edge)
    gm_at_csf: np.ndarray  # grey matter next to sulcal CSF: what cortical thinning turns into CSF
    lobes: dict[str, np.ndarray]  # each AD pattern's lobe weight in [0, 1] (AD_PATTERNS: temporal, posterior)
    regions: np.ndarray  # uint8 region labels (synth.regions.REGION_LABELS)
    origin_mm: np.ndarray  # MNI mm of voxel (0, 0, 0)


def template_paths() -> tuple[Path, Path, Path]:
    """The T1, GM and WM template files inside the installed nilearn (the files ``load_mni152_*`` read)."""
    spec = importlib.util.find_spec("nilearn")  # not imported: nilearn.datasets pulls in scikit-learn (~3 s)
    if spec is None or spec.origin is None:
        raise RuntimeError("synth needs nilearn installed: its bundled MNI152 templates are the anatomy model")
    data = Path(spec.origin).parent / "datasets" / "data"
    paths = tuple(data / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"nilearn's bundled MNI152 2009 templates are missing: {missing}; reinstall nilearn")
    return paths


@functools.lru_cache(maxsize=1)
def load_templates() -> Templates:
    """Read nilearn's bundled 1 mm MNI152 2009 templates (no network) and derive CSF, regions and weights."""
    images = [nib.load(path) for path in template_paths()]
    # As nilearn's load_mni152_*_template: each map rescaled by its maximum (uint8 0..255 -> 0..1).
    arrays = [np.asarray(img.get_fdata(dtype=np.float32)) for img in images]
    arrays = [a / a.max() for a in arrays]
    affine = images[0].affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise RuntimeError(f"nilearn's MNI152 template is not 1 mm RAS (affine {affine.tolist()}); synth needs it")
    lo = np.round(BOX_MIN_MM - affine[:3, 3]).astype(int)
    hi = np.round(BOX_MAX_MM - affine[:3, 3]).astype(int) + 1
    pad = [(max(0, -lo[i]), max(0, hi[i] - arrays[0].shape[i])) for i in range(3)]
    sl = tuple(slice(lo[i] + pad[i][0], hi[i] + pad[i][0]) for i in range(3))
    t1, gm, wm = (np.pad(a, pad)[sl] for a in arrays)

    # Soft brain mask: the skull-stripped template's support, edge softened to a partial-volume ramp.
    brain = np.clip(ndi.gaussian_filter((t1 > 0).astype(np.float32), 0.6), 0, 1)
    gm = np.minimum(gm, brain)
    wm = np.minimum(wm, brain - gm)
    csf = np.clip(brain - gm - wm, 0, 1)

    origin = affine[:3, 3] + lo
    axes = tuple(origin[i] + np.arange(t1.shape[i], dtype=np.float32) for i in range(3))  # MNI mm
    regions = build_regions(axes, csf, gm, wm, brain)
    # Cortical thinning acts where grey matter touches sulcal (not ventricular) CSF.
    sulcal = np.where(np.isin(regions, VENTRICLES), 0.0, csf).astype(np.float32)
    gm_at_csf = gm * np.clip(3.0 * ndi.gaussian_filter(sulcal, 1.5), 0, 1)
    return Templates(
        csf=csf,
        gm=gm,
        wm=wm,
        brain=brain,
        gm_at_csf=gm_at_csf.astype(np.float32),
        lobes={"temporal": temporal_weight(axes), "posterior": posterior_weight(axes)},
        regions=regions,
        origin_mm=origin.astype(np.float64),
    )


@dataclass(frozen=True)
class Anatomy:
    """Template maps resampled to one spacing, ready for a single ``grid_sample``."""

    spacing: float
    source: torch.Tensor  # (5, X, Y, Z) float32, channels SOURCE_CHANNELS
    regions: torch.Tensor  # (X, Y, Z) uint8 region labels
    brain: torch.Tensor  # (X, Y, Z) float32 soft brain mask
    origin_mm: np.ndarray  # MNI mm of source voxel (0, 0, 0)


def _resample(volume: np.ndarray, factor: float, order: int) -> np.ndarray:
    # 1 mm -> `factor` mm on the same origin; blur first when coarsening, so thin structures average out
    # instead of aliasing.
    if factor == 1.0:
        return volume
    if order > 0 and factor > 1.0:
        volume = ndi.gaussian_filter(volume, 0.5 * np.sqrt(factor**2 - 1.0))
    size = [int(np.floor((n - 1) / factor)) + 1 for n in volume.shape]
    coords = np.meshgrid(*[np.arange(s, dtype=np.float32) * factor for s in size], indexing="ij")
    return ndi.map_coordinates(volume, coords, order=order, mode="nearest")


@functools.lru_cache(maxsize=4)
def anatomy_at(spacing: float, ad_pattern: str = "temporal") -> Anatomy:
    """The anatomy sampled at ``spacing`` mm, its last channel the ``ad_pattern``'s cortex (cached per process)."""
    if ad_pattern not in AD_PATTERNS:
        raise ValueError(f"ad_pattern must be one of {AD_PATTERNS}, got {ad_pattern!r}")
    t = load_templates()
    channels = [t.csf, t.gm, t.wm, t.gm_at_csf, t.gm_at_csf * t.lobes[ad_pattern]]
    source = np.stack([_resample(c, spacing, 1) for c in channels]).astype(np.float32)
    return Anatomy(
        spacing=float(spacing),
        source=torch.from_numpy(np.ascontiguousarray(source)),
        regions=torch.from_numpy(np.ascontiguousarray(_resample(t.regions, spacing, 0))),
        brain=torch.from_numpy(np.ascontiguousarray(_resample(t.brain, spacing, 1).astype(np.float32))),
        origin_mm=t.origin_mm.copy(),
    )


def output_affine(spacing: float, shape: tuple[int, int, int]) -> np.ndarray:
    """RAS+ voxel-to-mm affine of the output volume: ``spacing`` mm voxels, centred on the brain."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = BRAIN_CENTRE_MM - spacing * (np.asarray(shape, dtype=np.float64) - 1) / 2
    return affine
