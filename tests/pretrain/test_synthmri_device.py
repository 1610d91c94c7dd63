"""synthmri generated in the training process a batch at a time: the same items as the worker path for the
same positions (both synth's ``SyntheticMRIStream``), exact resume, and the device setting's checks."""

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from pretrain.config import SynthMRIConfig
from pretrain.corpora.stream import CorpusStream, make_loader
from pretrain.corpora.synthmri import SynthMRISource
from pretrain.corpora.synthmri_device import DeviceSynthStream, generation_device
from synth.dataset import SyntheticMRIStream


@pytest.fixture(scope="module")
def source():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield SynthMRISource(SynthMRIConfig(), [32, 32, 32], [4.0, 4.0, 4.0], seed=0)
    torch.set_num_threads(before)


def test_batches_equal_the_worker_path_items_and_resume_exactly(source):
    batches = iter(DeviceSynthStream(source, 0, rank=0, world_size=1, batch_size=2, device="cpu"))
    first, second = next(batches), next(batches)
    assert first["image"].shape == (2, 1, 32, 32, 32) and first["_batch"].tolist() == [0, 0]
    workers = iter(make_loader(CorpusStream(source, 0, 0, 1, batch_size=4), num_workers=0, prefetch_factor=2))
    reference = next(workers)["image"]  # positions 0..3, generated one volume at a time
    subjects = next(iter(SyntheticMRIStream(source.synth_cfg, 0, batch_size=4)))  # synth's subjects 0..3
    crops = [np.random.default_rng([0, p]) for p in subjects["position"].tolist()]  # as CorpusStream seeds an item
    assert torch.equal(torch.stack([source.fitted(v, r) for v, r in zip(subjects["image"], crops)]), reference)
    assert torch.allclose(torch.cat([first["image"], second["image"]]), reference, rtol=0, atol=1e-5)
    resumed = next(iter(DeviceSynthStream(source, 0, 0, 1, 2, "cpu", start=1)))
    assert torch.equal(resumed["image"], second["image"]) and resumed["_batch"].tolist() == [1, 1]
    other_rank = next(iter(DeviceSynthStream(source, 0, rank=1, world_size=2, batch_size=2, device="cpu")))
    assert not torch.allclose(other_rank["image"], first["image"])  # rank 1 takes positions 2, 3


def test_device_setting():
    cpu = torch.device("cpu")
    assert generation_device("cpu", cpu) is None and generation_device("auto", cpu) is None
    with pytest.raises(ConfigError, match="trains on cpu"):
        generation_device("cuda", cpu)
    with pytest.raises(ConfigError, match="must be one of auto, cpu, cuda"):
        generation_device("gpu", cpu)


def test_a_run_trains_on_in_process_batches(tmp_path, monkeypatch):
    # No GPU here: route "generate in the training process" to the CPU to run the same code path end to end.
    import pretrain.corpora.synthmri_device as module
    from pretrain.cli import main
    from tests.pretrain.conftest import tiny_config, write_yaml

    made = []

    class Counting(DeviceSynthStream):
        def __iter__(self):
            for batch in super().__iter__():
                made.append(batch["_batch"].tolist())
                yield batch

    monkeypatch.setattr(module, "generation_device", lambda setting, device: torch.device("cpu"))
    monkeypatch.setattr(module, "DeviceSynthStream", Counting)
    cfg = tiny_config(data={"num_workers": 0}, train={"steps": 2, "image_every": 0, "checkpoint_every": 0})
    args = ["--corpus", "synthmri", "--config", write_yaml(tmp_path / "c.yaml", cfg), "--out", str(tmp_path / "r")]
    assert main(args) == 0
    assert made[:2] == [[0, 0], [1, 1]]  # batches 0 and 1 of rank 0
