"""The classical baseline on toy sets whose answer is known, and inside a cell."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from finetune.classical import L2, fit_predict, voxel_features
from finetune.config import RunConfig
from finetune.metrics import regression_metrics
from finetune.run import CLASSICAL_FILE, run_cell


def _toy(n: int = 90, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    # (n, 1, 8, 8, 8) noise volumes whose front half brightens with the target (as ageing spreads over the brain)
    rng = np.random.default_rng(seed)
    y = rng.uniform(20, 90, n)
    vol = rng.normal(0, 0.5, (n, 1, 8, 8, 8))
    vol[:, :, :4] += (y[:, None, None, None, None] - 55) / 5
    return torch.from_numpy(vol).float(), y


def test_pooling_shapes():
    x = voxel_features(torch.ones(3, 1, 8, 8, 6), 2)
    assert x.shape == (3, 4 * 4 * 3) and np.allclose(x, 1)


def test_ridge_recovers_a_linear_target_and_logistic_a_class():
    vol, y = _toy()
    x = voxel_features(vol, 2)
    train, val, test = np.arange(50), np.arange(50, 70), np.arange(70, 90)
    _, pred, chosen = fit_predict(x, y, "regression", train, val, test)
    m = regression_metrics(y[test], pred)
    assert m["pearson_r"] > 0.95 and m["mae"] < 5  # the mean predictor's MAE is ~17 y
    assert chosen["n_features"] == 64 and chosen["l2"] in L2["regression"]
    labels = (y > 55).astype(int)
    _, prob, chosen = fit_predict(x, labels, "classification", train, val, test)
    assert prob.shape == (20, 2) and ((prob[:, 1] > 0.5) == labels[test]).mean() >= 0.9
    assert chosen["l2"] in L2["classification"]


def test_regularisation_is_chosen_on_validation_not_test():
    vol, y = _toy()
    x = voxel_features(vol, 2)
    train, val, test = np.arange(50), np.arange(50, 70), np.arange(70, 90)
    y_shuffled_test = y.copy()
    y_shuffled_test[test] = y[test][::-1]  # changing the test labels must not change the choice or the output
    a = fit_predict(x, y, "regression", train, val, test)
    b = fit_predict(x, y_shuffled_test, "regression", train, val, test)
    assert a[2] == b[2] and np.allclose(a[1], b[1])


def test_cell_scores_the_classical_baseline_on_its_folds(age_cohort, tmp_path):
    cfg = RunConfig(task="brain_age", manifest=str(age_cohort), bootstrap=50)
    cfg.model.backbone, cfg.model.kwargs = "vit_tiny_p16", {"patch_size": 8, "depth": 1}
    cfg.data.shape, cfg.data.num_workers, cfg.train.mode = [16, 16, 16], 0, "linear"
    cfg.protocol.folds, cfg.protocol.val_fraction = 2, 0.3
    result = run_cell(cfg, tmp_path / "run")
    classical = pd.read_csv(tmp_path / "run" / CLASSICAL_FILE)
    deep = pd.read_csv(tmp_path / "run/predictions.csv")
    key = ["subject_id", "fold", "split"]
    assert classical[key].equals(deep[key])  # the same subjects, folds and splits as the deep model
    assert "mae" in result["classical"] and "mae_lo" in result["classical"]
    assert all(f["classical"]["l2"] in L2["regression"] for f in result["folds"])
