"""How far apart two generated folders are: cross-validated classifiers that tell A's volumes from B's.

    python -m synth gap --a DIR_A --b DIR_B [--out gap.json] [--seed S] [--max-per-side N]

Each folder is a ``python -m synth generate|cohort`` output (``manifest.csv`` with a ``path`` column). The volumes
are read as the models see them (4 mm, z-scored inside the brain, ``synth.realism``'s preprocessing); two logistic
regressions, each 5-fold stratified cross-validated, tell the folders apart:

- voxels: the volumes average-pooled to 8 mm and standardised (anatomy, contrast, artefacts, pose: everything);
- histogram: each volume's histogram of brain intensities (contrast, noise and artefacts, hardly anatomy).

ROC-AUC 0.5 says the two domains cannot be told apart; 1.0 that every volume gives its folder away. The same
two measures on two folders of one config give the floor a finite sample reaches by chance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.data import ManifestDataset, PreprocessConfig, read_manifest
from common.errors import DataError

READ_SPACING_MM = 4.0  # as the models (and synth.realism) read the volumes
FIELD_MM = (160, 192, 160)  # the generator's field of view
POOL = 2  # 4 mm -> 8 mm voxels for the voxel classifier (20 x 24 x 20 = 9600 features)
HISTOGRAM_BINS = 32
HISTOGRAM_RANGE = (-4.0, 4.0)  # z-scores inside the brain
FOLDS = 5


def read_folder(folder: str | Path, max_n: int, seed: int) -> torch.Tensor:
    """Volumes ``(N, 1, 40, 48, 40)`` of a generated folder, at most ``max_n`` of them (a seeded random subset)."""
    manifest = Path(folder).expanduser() / "manifest.csv"
    df = read_manifest(manifest, required=("path",), check_files=True)
    if len(df) > max_n:
        df = df.iloc[np.sort(np.random.default_rng(seed).choice(len(df), max_n, replace=False))]
    shape = tuple(round(n / READ_SPACING_MM) for n in FIELD_MM)
    pre = PreprocessConfig(spacing=(READ_SPACING_MM,) * 3, shape=shape, intensity="zscore", crop_foreground=False)
    dataset = ManifestDataset(df.reset_index(drop=True), pre)
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def voxel_features(volumes: torch.Tensor) -> np.ndarray:
    """``(N, 1, D, H, W)`` -> ``(N, D/2 * H/2 * W/2)``: the volumes average-pooled to 8 mm."""
    return F.avg_pool3d(volumes.float(), POOL, ceil_mode=True).flatten(1).numpy().astype(np.float64)


def histogram_features(volumes: torch.Tensor) -> np.ndarray:
    """``(N, 1, D, H, W)`` -> ``(N, HISTOGRAM_BINS)``: each volume's share of brain (non-zero) voxels per bin."""
    rows = []
    for v in volumes.flatten(1).numpy():
        counts = np.histogram(v[v != 0], bins=HISTOGRAM_BINS, range=HISTOGRAM_RANGE)[0]
        rows.append(counts / max(counts.sum(), 1))
    return np.asarray(rows, dtype=np.float64)


def cross_validated(features: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, object]:
    """ROC-AUC and balanced accuracy of a standardised logistic regression, per fold and pooled over folds."""
    folds = StratifiedKFold(min(FOLDS, int(np.bincount(labels).min())), shuffle=True, random_state=seed)
    scores = np.zeros(len(labels))
    per_fold = []
    for train, test in folds.split(features, labels):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
        model.fit(features[train], labels[train])
        scores[test] = model.predict_proba(features[test])[:, 1]
        per_fold.append(
            {
                "roc_auc": float(roc_auc_score(labels[test], scores[test])),
                "balanced_accuracy": float(balanced_accuracy_score(labels[test], scores[test] > 0.5)),
            }
        )
    return {
        "roc_auc": float(roc_auc_score(labels, scores)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, scores > 0.5)),
        "folds": per_fold,
    }


def domain_gap(dir_a: str | Path, dir_b: str | Path, seed: int = 0, max_per_side: int = 200) -> dict[str, object]:
    """The gap between two generated folders: ``{"n_a", "n_b", "voxels": {...}, "histogram": {...}}``, each
    classifier's pooled ``roc_auc`` and ``balanced_accuracy`` and its ``folds`` (B is the positive class)."""
    a, b = (read_folder(d, max_per_side, seed) for d in (dir_a, dir_b))
    if min(len(a), len(b)) < 2:
        raise DataError(dir_a if len(a) < 2 else dir_b, "needs at least 2 volumes for a cross-validated gap")
    volumes = torch.cat([a, b])
    labels = np.r_[np.zeros(len(a), int), np.ones(len(b), int)]
    return {
        "n_a": len(a),
        "n_b": len(b),
        "voxels": cross_validated(voxel_features(volumes), labels, seed),
        "histogram": cross_validated(histogram_features(volumes), labels, seed),
    }


def describe(gap: dict[str, object]) -> str:
    """The gap as a few printable lines."""
    lines = [f"{gap['n_a']} volumes (A) vs {gap['n_b']} (B), {FOLDS}-fold CV; chance: ROC-AUC 0.5"]
    for name in ("voxels", "histogram"):
        result = gap[name]
        folds = ", ".join(f"{f['roc_auc']:.2f}" for f in result["folds"])
        lines.append(
            f"{name}: ROC-AUC {result['roc_auc']:.3f}, balanced accuracy {result['balanced_accuracy']:.3f} "
            f"(fold ROC-AUCs {folds})"
        )
    return "\n".join(lines)
