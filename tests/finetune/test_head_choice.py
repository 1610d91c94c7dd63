"""``train.head_init=choose`` in a whole cell: every fold, in k-fold and in a hold-out, records the head start it kept
and both validation scores, and a cell that failed half-way and is run again gives what an unbroken run gives."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from finetune.model_folder import model_dir
from finetune.modes import full
from finetune.run import run_cell
from tests.finetune.test_run import tiny_config


def choose_config(manifest, mode: str = "full", **protocol):
    cfg = tiny_config("ad", manifest, mode=mode, **protocol)
    cfg.train.epochs, cfg.train.head_init = 2, "choose"
    return cfg


@pytest.mark.parametrize(
    "mode, protocol",
    [("full", {"folds": 2}), ("full", {"scheme": "holdout", "test_fraction": 0.3}), ("lora", {"folds": 2})],
)
def test_every_fold_records_the_kept_start_and_both_scores(ad_cohort, tmp_path, mode, protocol):
    result = run_cell(choose_config(ad_cohort, mode, **protocol), tmp_path / "run")
    assert len(result["folds"]) == protocol.get("folds", 1)
    for fold in result["folds"]:
        scores = fold["head_val_scores"]
        assert set(scores) == {"random", "probe"} and all(np.isfinite(list(scores.values())))
        assert fold["head_init"] in scores and scores[fold["head_init"]] == max(scores.values()) == fold["val_score"]
        assert fold["precision"] in ("bf16", "fp32")  # the precision check ran
    last = result["folds"][-1]
    model = json.loads((model_dir(tmp_path / "run", last["fold"], len(result["folds"])) / "config.json").read_text())
    assert model["fine_tuning"]["head_init"] == last["head_init"]  # the model folder says how it was trained


def test_a_cell_that_failed_half_way_is_run_again_to_the_same_predictions(ad_cohort, tmp_path, monkeypatch):
    """The second fold fails in its second run (the probe start); the rerun gives an unbroken run's predictions."""
    cfg = choose_config(ad_cohort, folds=2)
    calls, fit = [], full._fit

    def failing_fit(*args):
        calls.append(args[-1])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return fit(*args)

    monkeypatch.setattr(full, "_fit", failing_fit)
    with pytest.raises(KeyboardInterrupt):
        run_cell(cfg, tmp_path / "run")
    assert calls == ["random", "probe", "random", "probe"] and not (tmp_path / "run").exists()
    monkeypatch.setattr(full, "_fit", fit)
    resumed = run_cell(cfg, tmp_path / "run")
    unbroken = run_cell(cfg, tmp_path / "unbroken")
    assert [f["head_val_scores"] for f in resumed["folds"]] == [f["head_val_scores"] for f in unbroken["folds"]]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "run/predictions.csv"), pd.read_csv(tmp_path / "unbroken/predictions.csv")
    )
