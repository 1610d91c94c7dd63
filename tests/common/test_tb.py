import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.tb import RankZeroWriter


def as_rank(monkeypatch, rank: str) -> None:
    """The rank a launcher gives through the environment, before any process group exists (another test of
    this session may have made one)."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", rank)


def test_rank_zero_writes_events(tmp_path, monkeypatch):
    as_rank(monkeypatch, "0")
    with RankZeroWriter(tmp_path / "tb") as w:
        w.add_scalar("loss", 1.5, 3)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    (event,) = acc.Scalars("loss")
    assert event.step == 3 and event.value == 1.5


def test_other_ranks_write_nothing(tmp_path, monkeypatch):
    as_rank(monkeypatch, "1")
    with RankZeroWriter(tmp_path / "tb") as w:
        w.add_scalar("loss", 1.0, 0)
    assert not (tmp_path / "tb").exists()
