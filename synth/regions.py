"""Label values and the regions disease and ageing act on, approximated in MNI152 millimetre coordinates.

The MNI152 2009 templates bundled with nilearn carry tissue probabilities but no structure atlas, so the
regions are built from simple shapes in MNI space (RAS+, mm) intersected with the tissue they consist of:

- lateral ventricles: the connected component of CSF (p > 0.5, > 8 mm inside the brain) that fills the box
  around the ventricles' bodies, split at x = 0 (the 3rd ventricle and septum, |x| < 2 mm, excluded);
- hippocampi: capsules (a segment swept by a 5 mm ball) from the head at (±24, -10, -20) to the tail at (±28,
  -38, -2), grey-matter probability > 0.35;
- putamen: ellipsoids at (±25, 2, 1), semi-axes (6, 13, 9) mm, grey matter > 0.35;
- caudate: ellipsoids at (±13, 10, 10), semi-axes (5, 11, 9) mm, grey matter > 0.35, outside the ventricles;
- midbrain (with the substantia nigra): an ellipsoid at (0, -26, -10), semi-axes (13, 11, 8) mm, brain tissue;
- temporal lobes (a weight for AD's extra cortical thinning, not a label): smooth ellipsoids at (±45, -18,
  -20), semi-axes (22, 42, 20) mm;
- parietal and occipital lobes (the weight of posterior-predominant AD's thinning): smooth ellipsoids at
  (±28, -70, 28), semi-axes (28, 32, 38) mm.

The coordinates follow the usual MNI positions of these structures (e.g. the Harvard-Oxford subcortical
atlas); they are an approximation good enough for volume effects, not a segmentation.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

Grid = tuple[np.ndarray, np.ndarray, np.ndarray]  # the 1-D mm coordinates of each voxel axis

BACKGROUND, CSF, GM, WM = 0, 1, 2, 3
REGION_LABELS = {
    "left_lateral_ventricle": 4,
    "right_lateral_ventricle": 5,
    "left_hippocampus": 6,
    "right_hippocampus": 7,
    "left_putamen": 8,
    "right_putamen": 9,
    "left_caudate": 10,
    "right_caudate": 11,
    "midbrain": 12,
}
LABELS = {"background": BACKGROUND, "csf": CSF, "gm": GM, "wm": WM, **REGION_LABELS}
VENTRICLES = (4, 5)
HIPPOCAMPI = (6, 7)
PUTAMEN = (8, 9)
CAUDATE = (10, 11)
MIDBRAIN = (12,)


def _grid(axes: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # three 1-D axes (mm) -> broadcastable (X,1,1), (1,Y,1), (1,1,Z)
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def _ellipsoid(axes: Grid, centre: tuple[float, ...], semi: tuple[float, ...]) -> np.ndarray:
    # squared normalised radius (X, Y, Z); inside where <= 1
    return sum(((g - c) / r) ** 2 for g, c, r in zip(_grid(axes), centre, semi))


def _capsule(axes: Grid, a: tuple[float, ...], b: tuple[float, ...], radius: float) -> np.ndarray:
    # points within `radius` of the segment a-b, evaluated only in the segment's bounding box
    lo = np.minimum(a, b) - radius
    hi = np.maximum(a, b) + radius
    box = tuple(
        slice(int(np.searchsorted(ax, low)), int(np.searchsorted(ax, high, side="right")))
        for ax, low, high in zip(axes, lo, hi)
    )
    p = [g - ai for g, ai in zip(_grid(tuple(ax[sl] for ax, sl in zip(axes, box))), a)]
    ab = np.subtract(b, a)
    t = np.clip(sum(abi * pi for abi, pi in zip(ab, p)) / float(ab @ ab), 0, 1)
    inside = sum((pi - t * abi) ** 2 for abi, pi in zip(ab, p)) <= radius**2
    out = np.zeros(tuple(len(ax) for ax in axes), bool)
    out[box] = inside
    return out


def _lobe_weight(axes: Grid, centre: tuple[float, float, float], semi: tuple[float, float, float]) -> np.ndarray:
    # 1 inside the ellipsoid pair (mirrored at x = 0), falling off over ~1 semi-axis outside
    w = np.zeros(tuple(len(ax) for ax in axes), np.float32)
    for sx in (-1, 1):
        r2 = _ellipsoid(axes, (centre[0] * sx, centre[1], centre[2]), semi)
        w = np.maximum(w, np.exp(-np.maximum(r2 - 1.0, 0.0) * 2.0).astype(np.float32))
    return w


def temporal_weight(axes: Grid) -> np.ndarray:
    """Smooth weight (X, Y, Z) in [0, 1]: 1 in the temporal lobes, falling off over ~1 semi-axis."""
    return _lobe_weight(axes, (45.0, -18.0, -20.0), (22.0, 42.0, 20.0))


def posterior_weight(axes: Grid) -> np.ndarray:
    """Smooth weight (X, Y, Z) in [0, 1]: 1 in the parietal and occipital lobes (posterior cortical atrophy's
    territory), falling off over ~1 semi-axis."""
    return _lobe_weight(axes, (28.0, -70.0, 28.0), (28.0, 32.0, 38.0))


def build_regions(axes: Grid, csf: np.ndarray, gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Region label map (X, Y, Z) uint8 (0 outside every region) on the template grid; ``axes`` in MNI mm."""
    x = _grid(axes)[0]
    regions = np.zeros(csf.shape, np.uint8)
    # lateral ventricles: deep CSF component overlapping the ventricle box most
    deep = (csf > 0.5) & ndi.binary_erosion(brain > 0.5, iterations=8)  # > 8 mm (city-block) inside
    comp, n = ndi.label(deep)
    box = (_ellipsoid(axes, (0.0, -12.0, 14.0), (25.0, 35.0, 14.0)) <= 1) & (np.abs(x) >= 3)
    if n:
        counts = np.bincount(comp[box], minlength=n + 1)
        counts[0] = 0
        ventricles = (comp == counts.argmax()) & (np.abs(x) >= 2)
        regions[ventricles & (x < 0)] = REGION_LABELS["left_lateral_ventricle"]
        regions[ventricles & (x > 0)] = REGION_LABELS["right_lateral_ventricle"]
    free = regions == 0
    grey = (gm > 0.35) & free
    for side, sx in (("left", -1.0), ("right", 1.0)):
        hip = _capsule(axes, (24.0 * sx, -10.0, -20.0), (28.0 * sx, -38.0, -2.0), 5.0) & grey
        regions[hip] = REGION_LABELS[f"{side}_hippocampus"]
        put = (_ellipsoid(axes, (25.0 * sx, 2.0, 1.0), (6.0, 13.0, 9.0)) <= 1) & grey
        regions[put] = REGION_LABELS[f"{side}_putamen"]
        cau = (_ellipsoid(axes, (13.0 * sx, 10.0, 10.0), (5.0, 11.0, 9.0)) <= 1) & grey
        regions[cau & (regions == 0)] = REGION_LABELS[f"{side}_caudate"]
    mid = (_ellipsoid(axes, (0.0, -26.0, -10.0), (13.0, 11.0, 8.0)) <= 1) & ((gm + wm) > 0.5)
    regions[mid & (regions == 0)] = REGION_LABELS["midbrain"]
    return regions


def label_volumes(labels: np.ndarray, spacing: float) -> dict[str, float]:
    """Volumes in mL measured on a label map: the regions disease acts on, tissues, and the whole brain."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=max(LABELS.values()) + 1)
    ml = spacing**3 / 1000.0
    volume = lambda labs: round(float(counts[list(labs)].sum()) * ml, 3)
    brain = [v for v in LABELS.values() if v not in (BACKGROUND, CSF, *VENTRICLES)]
    return {
        "ventricle_ml": volume(VENTRICLES),
        "hippocampus_ml": volume(HIPPOCAMPI),
        "putamen_ml": volume(PUTAMEN),
        "caudate_ml": volume(CAUDATE),
        "midbrain_ml": volume(MIDBRAIN),
        "csf_ml": volume((CSF,)),
        "gm_ml": volume((GM,)),
        "wm_ml": volume((WM,)),
        "brain_ml": volume(brain),
    }
