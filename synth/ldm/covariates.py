"""The four covariates an LDM is conditioned on, how they are read from a manifest, and how they are drawn.

Order and meaning follow the public UK Biobank brain LDM (Pinaya et al. 2022, MONAI bundle
``brain_image_synthesis_latent_diffusion_model``): ``[sex, age, ventricle_volume, brain_volume]``, each mapped
to [0, 1] before it reaches the network. Natural units: sex 0 = female, 1 = male (UK Biobank field 31's
coding), age in years, volumes in millilitres. A model stores the affine map natural -> [0, 1]
(:class:`CovariateSpace`) and, when trained here, the table of its training covariates, from which
unspecified covariates are drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from common.errors import DataError

COVARIATES = ("sex", "age", "ventricle_volume", "brain_volume")
# Names of the same covariates in the bundle's inference.json (its conditioning expression orders them).
BUNDLE_NAMES = {
    "gender": "sex",
    "age": "age",
    "ventricular_vol": "ventricle_volume",
    "brain_vol": "brain_volume",
}
# measured volumes (mL) a manifest may carry instead of label maps: ours, then the anatomy-model generator's
VOLUME_COLUMNS = (("ventricle_volume", "brain_volume"), ("ventricle_ml", "brain_ml"))
_SEX_CODES = {"f": 0.0, "female": 0.0, "0": 0.0, "0.0": 0.0, "m": 1.0, "male": 1.0, "1": 1.0, "1.0": 1.0}


def sex_code(value: object) -> float:
    """``F``/``female``/0 -> 0.0, ``M``/``male``/1 -> 1.0; anything else raises ``ValueError``."""
    code = _SEX_CODES.get(str(value).strip().lower())
    if code is None:
        raise ValueError(f"sex {value!r} is not one of F, M, female, male, 0, 1")
    return code


def sex_label(code: float) -> str:
    """The manifest's ``sex`` value for a code (rounded: a drawn code is 0 or 1)."""
    return "M" if code >= 0.5 else "F"


@dataclass
class LabelScheme:
    """Which label values of a segmentation count as ventricles and which are not brain at all."""

    ventricles: tuple[int, ...]  # summed into ventricle_volume
    non_brain: tuple[int, ...]  # background and extra-ventricular CSF; brain_volume = everything else, minus ventricles


def label_volumes(path: str | Path, scheme: LabelScheme) -> tuple[float, float]:
    """``(ventricle_volume, brain_volume)`` in mL from an integer label map (voxel size from its header)."""
    try:
        img = nib.load(str(path))
        labels = np.asarray(img.dataobj)
    except Exception as e:  # missing file, not NIfTI, truncated gzip
        raise DataError(path, f"cannot read the label map ({type(e).__name__}: {e})") from e
    if labels.ndim != 3:
        raise DataError(path, f"a label map must be 3D, got shape {labels.shape}")
    labels = np.rint(labels).astype(np.int64)
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    ventricles = np.isin(labels, scheme.ventricles)
    brain = ~np.isin(labels, scheme.non_brain) & ~ventricles
    if not brain.any():
        raise DataError(
            path,
            f"the label map has no brain voxels (labels other than {scheme.non_brain} and "
            f"the ventricles {scheme.ventricles}); check data.label_scheme",
        )
    return float(ventricles.sum()) * voxel_ml, float(brain.sum()) * voxel_ml


def covariate_table(
    df: pd.DataFrame, manifest: str | Path, scheme: LabelScheme, label_column: str = "label_path"
) -> pd.DataFrame:
    """The ``(N, 4)`` covariates (natural units) of a manifest read by ``read_manifest``, one row per image.

    Volumes come from the label maps in ``label_column`` if the manifest has that column, else from the
    ``VOLUME_COLUMNS`` (mL). Raises ``DataError`` naming the manifest, column and line.
    """
    manifest = Path(manifest)
    for col in ("age", "sex"):
        if col not in df.columns:
            raise DataError(manifest, f"the LDM is conditioned on {col}, but the manifest has no {col!r} column")
    out = pd.DataFrame(index=df.index, columns=list(COVARIATES), dtype="float64")
    for i, value in df["sex"].items():
        try:
            out.loc[i, "sex"] = sex_code(value)
        except ValueError as e:
            raise DataError(manifest, f"column 'sex', line {i + 2}: {e}") from None
    out["age"] = pd.to_numeric(df["age"], errors="coerce")

    if label_column in df.columns:
        base = manifest.parent
        for i, rel in df[label_column].items():
            if pd.isna(rel):
                raise DataError(manifest, f"column {label_column!r} is empty on line {i + 2}")
            p = Path(str(rel)).expanduser()
            out.loc[i, ["ventricle_volume", "brain_volume"]] = label_volumes(p if p.is_absolute() else base / p, scheme)
    elif pair := next((p for p in VOLUME_COLUMNS if set(p) <= set(df.columns)), None):
        for col, src in zip(("ventricle_volume", "brain_volume"), pair):
            out[col] = pd.to_numeric(df[src], errors="coerce")
    else:
        raise DataError(
            manifest,
            f"the LDM needs ventricular and brain volume: give label maps in a "
            f"{label_column!r} column, or the columns 'ventricle_volume' and 'brain_volume' "
            f"(mL; the anatomy-model generator's 'ventricle_ml' and 'brain_ml' also do)",
        )
    bad = out.index[out.isna().any(axis=1)]
    if len(bad):
        cols = [c for c in COVARIATES if pd.isna(out.loc[bad[0], c])]
        raise DataError(
            manifest,
            f"line {bad[0] + 2}: {', '.join(cols)} missing or not a number ({len(bad)} row(s) affected)",
        )
    return out.reset_index(drop=True)


@dataclass
class CovariateSpace:
    """The affine map from natural units to the network's [0, 1] conditioning, per covariate."""

    low: tuple[float, ...]  # natural value that becomes 0
    high: tuple[float, ...]  # natural value that becomes 1

    @classmethod
    def fit(cls, table: pd.DataFrame) -> CovariateSpace:
        """Min-max of a training table; sex keeps its 0/1 coding, a constant column gets a unit-wide range."""
        low, high = [], []
        for col in COVARIATES:
            lo, hi = (0.0, 1.0) if col == "sex" else (float(table[col].min()), float(table[col].max()))
            low.append(lo)
            high.append(hi if hi > lo else lo + 1.0)
        return cls(tuple(low), tuple(high))

    @classmethod
    def identity(cls) -> CovariateSpace:
        """Values given already in the network's [0, 1] units (the public bundle publishes no ranges)."""
        return cls((0.0,) * 4, (1.0,) * 4)

    def normalise(self, values: np.ndarray) -> np.ndarray:
        """``(N, 4)`` natural units -> ``(N, 4)`` network units."""
        low, high = np.asarray(self.low), np.asarray(self.high)
        return ((np.asarray(values, dtype=np.float64) - low) / (high - low)).astype(np.float32)

    def to_dict(self) -> dict:
        return {c: [lo, hi] for c, lo, hi in zip(COVARIATES, self.low, self.high)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence[float]]) -> CovariateSpace:
        return cls(tuple(float(d[c][0]) for c in COVARIATES), tuple(float(d[c][1]) for c in COVARIATES))


def draw_covariates(
    rng: np.random.Generator, space: CovariateSpace, table: pd.DataFrame | None, fixed: Mapping[str, float]
) -> np.ndarray:
    """One ``(4,)`` covariate vector (natural units): ``fixed`` values as given, the others drawn.

    With a training ``table`` the others come from one random training row (so age and brain volume stay
    plausible together); without one (the public bundle) sex is a fair coin and the rest uniform over the
    space.
    """
    if table is not None and len(table):
        row = table.iloc[int(rng.integers(len(table)))]
        drawn = np.array([float(row[c]) for c in COVARIATES])
    else:
        u = rng.random(4)
        drawn = np.asarray(space.low) + u * (np.asarray(space.high) - np.asarray(space.low))
        drawn[0] = space.high[0] if u[0] >= 0.5 else space.low[0]
    for i, name in enumerate(COVARIATES):
        if name in fixed and fixed[name] is not None:
            drawn[i] = float(fixed[name])
    return drawn
