"""How much of a cohort's images is scanner and how much is anatomy, measured on the images a model sees.

    python -m synth.realism runs/cohorts_calibrated/brain_age/manifest.csv [--spacing 4] [--pool 2]

- site predictability: balanced accuracy of a 5-fold cross-validated logistic regression that predicts the
  site from the image's brain-intensity histogram (scanner contrast, noise and bias show there, anatomy hardly);
- variance share: per voxel (images z-scored, then average-pooled), the share of the between-subject variance
  that lies between sites (eta squared), averaged over voxels inside the brain; the rest is within-site
  (anatomy, covariates, within-protocol variation).
Targets beside the effect sizes in ``synth.targets`` (``SCANNER_TARGETS``).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.data import ManifestDataset, PreprocessConfig, read_manifest
from synth.targets import SCANNER_TARGETS


def site_predictability(volumes: torch.Tensor, sites: np.ndarray, bins: int = 32) -> float:
    """Balanced accuracy of predicting the site from each image's brain-intensity histogram (5-fold CV)."""
    x = volumes.flatten(1).numpy()
    feats = []
    for v in x:
        brain = v[v > np.percentile(v, 50)]  # the field of view is half background
        feats.append(np.histogram(brain, bins=bins, range=(np.percentile(x, 1), np.percentile(x, 99.9)))[0])
    feats = np.asarray(feats, float) / np.sum(feats, axis=1, keepdims=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(balanced_accuracy_score(sites, cross_val_predict(model, feats, sites, cv=folds)))


def site_variance_share(volumes: torch.Tensor, sites: np.ndarray, pool: int = 2) -> float:
    """Mean over brain voxels of the between-site share of between-subject variance (eta squared)."""
    x = F.avg_pool3d(volumes.float(), pool, ceil_mode=True).flatten(1).numpy() if pool > 1 else volumes.flatten(1)
    x = np.asarray(x, float)
    brain = x.mean(0) > np.percentile(x.mean(0), 50)
    x = x[:, brain]
    total = x.var(0)
    between = sum((sites == s).mean() * (x[sites == s].mean(0) - x.mean(0)) ** 2 for s in np.unique(sites))
    return float(np.mean(between[total > 0] / total[total > 0]))


def measure(manifest: str, spacing: float = 4.0, pool: int = 2) -> dict[str, float]:
    df = read_manifest(manifest, required=("path", "subject_id", "site"), check_files=True)
    shape = [int(round(n / spacing)) for n in (160, 192, 160)]
    pre = PreprocessConfig(spacing=(spacing,) * 3, shape=tuple(shape), intensity="zscore", crop_foreground=False)
    volumes = torch.stack([item["image"] for item in ManifestDataset(df[["path", "subject_id"]], pre)])
    sites = df["site"].astype(str).to_numpy()
    return {
        "site_balanced_accuracy": site_predictability(volumes, sites),
        "site_variance_share": site_variance_share(volumes, sites, pool),
        "chance": 1.0 / len(np.unique(sites)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m synth.realism", description=__doc__.split("\n\n")[0])
    p.add_argument("manifest")
    p.add_argument("--spacing", type=float, default=4.0, help="resample to this spacing, as the models see it")
    p.add_argument("--pool", type=int, default=2)
    args = p.parse_args(argv)
    m = measure(args.manifest, args.spacing, args.pool)
    print(f"chance (1 / sites): {m['chance']:.3f}")
    ok = True
    for t in SCANNER_TARGETS:
        passed = t.passes(m[t.key])
        ok &= passed
        print(f"{t.quantity}: {m[t.key]:.3f} (target {t.range}) {'pass' if passed else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
