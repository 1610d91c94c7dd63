"""The share of step time spent waiting for data: a TensorBoard scalar, a metrics.jsonl field and a field of
the run's result (the final JSON line of ``pretrain/main.py``)."""

import json
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.config import load_config
from common.models import create_backbone
from pretrain.config import PretrainConfig
from pretrain.corpora.stream import CorpusStream, make_loader
from pretrain.engine import Engine, build_ds_config, init_distributed
from pretrain.objectives import build_objective
from pretrain.provenance import export_metadata
from pretrain.trainer import Trainer
from tests.pretrain.conftest import TINY_VIT, tiny_config, write_yaml


class SlowSource:
    """Random 16³ volumes that take ``seconds`` each to "read": a starved device."""

    name = "slow"

    def __init__(self, seconds):
        self.seconds = seconds

    def item(self, position, rng):
        time.sleep(self.seconds)
        return torch.from_numpy(rng.random((1, 16, 16, 16), dtype="float32"))


def run(tmp_path, seconds):
    init_distributed()
    train = {"steps": 3, "log_every": 1, "image_every": 0, "checkpoint_every": 0, "precision": "fp32"}
    cfg = load_config(
        PretrainConfig, write_yaml(tmp_path / "c.yaml", tiny_config(data={"num_workers": 0}, train=train))
    )
    objective = build_objective(cfg.objective, create_backbone("vit_base_p16", img_size=16, **TINY_VIT))
    engine = Engine(objective, build_ds_config(cfg, None, 1, "fp32"))
    loader = lambda pos: make_loader(CorpusStream(SlowSource(seconds), 0, batch_size=2, **pos.stream_kwargs()), 0, 2)
    return Trainer(cfg, tmp_path / "run", engine, objective, loader, export_metadata(cfg)).run()


def test_a_starved_run_reports_its_data_wait_everywhere(tmp_path):
    result = run(tmp_path, seconds=0.25)  # 0.5 s of data per step against a step of a few ms
    assert 0.5 < result["data_wait_share"] <= 1.0
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    shares = [e.value for e in events.Scalars("train/data_wait_share")]
    assert len(shares) == 3 and all(0.5 < v <= 1.0 for v in shares)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # TensorBoard keeps float32: equal to that precision (rounding both to 6 digits could split 0.9786415)
    assert [x["data_wait_share"] for x in lines] == pytest.approx(shares, abs=1e-6)
