"""``train.probe_l2``, the linear probe's one grid of L2 penalties: saved runs' two grids (``probe_alpha`` for ridge,
``probe_c`` for logistic regression) still load into it, and a grid no model can use is refused."""

import logging

import pytest

from common.config import load_config, to_object
from common.errors import ConfigError
from finetune.config import RunConfig, validate


def train_of(tmp_path, yaml: str, *overrides: str):
    path = tmp_path / "config.yaml"
    path.write_text(yaml)
    return to_object(load_config(RunConfig, path, ["manifest=m.csv", *overrides])).train


def test_a_saved_runs_two_grids_load_as_the_one_grid_they_meant(tmp_path, caplog):
    """Every saved config.yaml holds both old grids (their defaults: C = 1/alpha, item by item)."""
    saved = "train:\n  probe_c: [0.001, 0.01, 0.1, 1.0, 10.0]\n  probe_alpha: [0.1, 1.0, 10.0, 100.0, 1000.0]\n"
    with caplog.at_level(logging.WARNING):
        train = train_of(tmp_path, saved)
    assert train.probe_l2 == RunConfig().train.probe_l2 == [0.1, 1.0, 10.0, 100.0, 1000.0]
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warned) == 2 and all("train.probe_l2" in line and "\n" not in line for line in warned)


def test_an_old_c_grid_is_read_as_the_penalties_one_over_c(tmp_path):
    assert train_of(tmp_path, "train:\n  probe_c: [0.01, 1.0]\n").probe_l2 == [1.0, 100.0]
    assert train_of(tmp_path, "{}\n", "train.probe_c=[0.5]").probe_l2 == [2.0]
    assert train_of(tmp_path, "train:\n  probe_alpha: [3.0]\n").probe_l2 == [3.0]


def test_old_grids_that_disagree_have_no_one_grid_and_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.probe_c.*train.probe_l2"):
        train_of(tmp_path, "train:\n  probe_c: [0.01]\n  probe_alpha: [1.0]\n")


@pytest.mark.parametrize("grid", ["[]", "[0.0, 1.0]", "[-1.0]", "[.inf]"])
def test_a_grid_without_positive_finite_penalties_is_refused(grid):
    cfg = to_object(load_config(RunConfig, None, ["manifest=m.csv", f"train.probe_l2={grid}"]))
    with pytest.raises(ConfigError, match="train.probe_l2 must be a non-empty list of positive finite"):
        validate(cfg)
