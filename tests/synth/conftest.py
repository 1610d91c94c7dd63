"""Shared synth fixtures: small cohorts at 4 mm (40x48x40), made once per test session."""

from __future__ import annotations

import pytest
import torch

from synth.cohort import Job, generate
from synth.config import SynthConfig


@pytest.fixture
def one_thread():
    # Volumes this small are dominated by tiny lattice ops, where a second OpenMP thread only adds waiting
    # (badly so on a shared machine). Used by the generator's test modules; restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cfg4() -> SynthConfig:
    return SynthConfig(spacing=4.0)


@pytest.fixture(scope="session")
def ad_cohort(tmp_path_factory, cfg4):
    """A 4-subject, 2-site AD cohort written in-process; returns its folder."""
    out = tmp_path_factory.mktemp("ad_cohort")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate(out, cfg4, Job(seed=3, task="ad", sites=2), 4, workers=1, show_progress=False)
    finally:
        torch.set_num_threads(before)
    return out
