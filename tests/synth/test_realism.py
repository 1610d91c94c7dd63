"""Scanner realism: the site is predictable from a tiny cohort's images, and only because sites differ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import NormalizeIntensity
from scipy.ndimage import binary_dilation

from common.config import load_config, to_object
from synth.config import SynthConfig
from synth.generator import Generator
from synth.realism import site_predictability, site_variance_share
from synth.subject import cohort_plan

pytestmark = pytest.mark.usefixtures("one_thread")
# every between-site range collapsed to one value: sites differ only by chance within-site draws
SAME_SCANNER = (
    "intensity.t1_site_sd=0",
    "intensity.gamma_log_sd=0",
    "scanner.noise_sd=[0.02,0.02]",
    "scanner.bias_sd=[0.1,0.1]",
    "scanner.rician_probability=1",
    "scanner.inplane_mm=[1,1]",
    "scanner.slice_mm=[1,1]",
)


def _cohort(overrides=(), n=30, sites=3, seed=5):
    cfg = to_object(load_config(SynthConfig, None, ["spacing=4.0", *overrides]))
    gen, zscore = Generator(cfg), NormalizeIntensity(nonzero=True)  # as the models see it (synth.realism)
    plans = [cohort_plan(cfg, "brain_age", seed, i, sites) for i in range(n)]
    volumes = torch.stack([torch.as_tensor(np.asarray(zscore(gen(p).image))) for p in plans])
    return volumes, np.array([p.site for p in plans])


def test_site_is_predictable_because_sites_differ():
    volumes, sites = _cohort()
    default = site_predictability(volumes, sites)
    same_volumes, same_sites = _cohort(SAME_SCANNER)
    same = site_predictability(same_volumes, same_sites)
    assert default >= 0.8, default  # chance is 1/3
    assert same <= 0.6, same
    # sites hold a share of the voxel variance, more than scanners that differ only by chance
    assert site_variance_share(same_volumes, same_sites) < site_variance_share(volumes, sites)


def test_t1_linear_background_is_zero_raw_keeps_the_noise_floor():
    # the z-scoring over non-zero voxels must see only the brain under t1-linear (skull-stripping's brain mask)
    fractions = {}
    for name in ("t1-linear", "raw"):
        cfg = to_object(
            load_config(SynthConfig, None, ["spacing=4.0", f"pipeline.name={name}", "scanner.rician_probability=1"])
        )
        vol = Generator(cfg)(cohort_plan(cfg, "brain_age", 5, 0, 3), with_labels=True)
        # two voxels (8 mm) away from the labelled brain: clear of the partial-volume edge
        far = ~binary_dilation(vol.labels.numpy() > 0, iterations=2)
        background = vol.image[0][torch.from_numpy(far)]  # image (1, D, H, W), labels (D, H, W)
        fractions[name] = float((background == 0).float().mean())
    assert fractions["t1-linear"] > 0.9 and fractions["raw"] < 0.1, fractions


def test_site_variance_share_weights_each_site_by_its_size():
    # two voxels: background (0 everywhere, below the median of the voxel means) and one brain voxel whose values
    # are 1, 2, 3 at site a (3 subjects) and 10 at site b (1 subject): mean 4, variance (9 + 4 + 1 + 36) / 4 = 12.5
    brain = torch.tensor([1.0, 2.0, 3.0, 10.0])
    volumes = torch.stack([torch.zeros(4), brain], dim=1).reshape(4, 1, 1, 1, 2)
    sites = np.array(["a", "a", "a", "b"])
    # between sites, each site weighted by its share of subjects: 3/4 · (2 - 4)² + 1/4 · (10 - 4)² = 12
    # (unweighted, (4 + 36) / 2 = 20 would exceed the total)
    assert site_variance_share(volumes, sites, pool=1) == pytest.approx(12 / 12.5)
