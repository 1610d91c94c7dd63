"""The batched generator: the same volumes as one at a time, for the same plans, whatever the batch."""

from __future__ import annotations

import pytest
import torch

from synth.generator import Generator
from synth.subject import cohort_plan, corpus_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def test_batched_equals_per_volume_for_the_same_plans(cfg4):
    gen = Generator(cfg4)
    # mixed scanners: rician and gaussian noise, thick slices along different axes, AD/PD effects
    plans = [corpus_plan(cfg4, 11, i) for i in range(3)] + [cohort_plan(cfg4, "ad", 2, 1, 2)]
    one_by_one = torch.stack([gen(plan).image for plan in plans])  # (B, 1, D, H, W)
    batched = gen.batch(plans)
    assert batched.shape == (4, 1, 40, 48, 40) and batched.dtype == torch.float32
    assert torch.allclose(batched, one_by_one, rtol=0, atol=1e-5)  # float rounding of the batched matmuls
    assert torch.allclose(gen.batch(plans[2:3]), one_by_one[2:3], rtol=0, atol=1e-5)  # batch size does not matter
