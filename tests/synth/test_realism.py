"""Scanner realism: the site is predictable from a tiny cohort's images, and only because sites differ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import NormalizeIntensity

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
