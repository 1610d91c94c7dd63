"""The synthetic stream (its seeding rule: subject per position, split over ranks, workers and batches) and
the dataset over a generated folder."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from common.config import load_config, to_object
from synth.config import SynthConfig
from synth.dataset import GeneratedDirectory, SyntheticMRIStream
from synth.generator import Generator
from synth.subject import corpus_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stream_batches_are_the_corpus_subjects_at_their_positions(cfg4):
    stream = SyntheticMRIStream(cfg4, seed=1, batch_size=2, length=1)
    (batch,) = list(stream)
    assert len(stream) == 1 and batch["image"].shape == (2, 1, 40, 48, 40) and batch["image"].dtype == torch.float32
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert batch["position"].tolist() == [0, 1]
    # position p is subject p of the corpus of that seed (as `python -m synth generate --seed 1` writes it)
    plan = corpus_plan(cfg4, 1, 1)
    assert torch.equal(batch["image"][1], Generator(cfg4)(plan).image)
    assert batch["age"].dtype == torch.float32 and batch["age"][1] == pytest.approx(plan.age)


def test_ranks_split_the_positions_and_workers_or_a_resume_give_the_same_batches(cfg4):
    rank0 = list(SyntheticMRIStream(cfg4, seed=1, rank=0, world_size=2, length=2))
    rank1 = list(SyntheticMRIStream(cfg4, seed=1, rank=1, world_size=2, length=2))
    assert [b["position"].tolist() for b in rank0 + rank1] == [[0], [2], [1], [3]]
    assert not torch.equal(rank0[0]["image"], rank1[0]["image"])
    stream = SyntheticMRIStream(cfg4, seed=1, rank=0, world_size=2, length=2)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    for a, b in zip(loader, rank0, strict=True):  # two workers: the same batches, in the same order
        assert torch.equal(a["image"], b["image"])
    (resumed,) = list(SyntheticMRIStream(cfg4, seed=1, rank=0, world_size=2, start=1, length=1))
    assert torch.equal(resumed["image"], rank0[1]["image"])


def test_batched_on_a_device_equals_one_volume_at_a_time(cfg4):
    one_by_one = next(iter(SyntheticMRIStream(cfg4, seed=4, batch_size=2)))
    batched = next(iter(SyntheticMRIStream(cfg4, seed=4, batch_size=2, device="cpu")))
    assert torch.equal(batched["position"], one_by_one["position"]) and torch.equal(batched["age"], one_by_one["age"])
    assert torch.allclose(batched["image"], one_by_one["image"], rtol=0, atol=1e-5)


def test_generated_directory(ad_cohort):
    ds = GeneratedDirectory(ad_cohort)
    assert len(ds) == 4 and ds[0].shape == (1, 40, 48, 40)
    item = GeneratedDirectory(ad_cohort, with_labels=True)[1]
    assert item["label"].shape == (40, 48, 40) and item["diagnosis"] in ("CN", "AD")


def test_default_yaml_is_the_dataclass_defaults():
    from pathlib import Path

    path = Path(__file__).parents[2] / "configs" / "synth" / "default.yaml"
    assert to_object(load_config(SynthConfig, path)) == SynthConfig()
    assert OmegaConf.to_yaml(OmegaConf.structured(SynthConfig()))  # the schema serialises (saved with cohorts)
