"""Full fine-tuning on a model that returns NaN: a NaN step is skipped and counted (the weights and BatchNorm's
running statistics keep their values), ten in a row stop the fold with advice, LP-FT refuses NaN features with
its own message, and the CLI ends with one ``error:`` line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune.cli import main
from finetune.config import OptimConfig, TrainConfig
from finetune.heads import FineTuneModel
from finetune.modes import full
from finetune.modes.common import FoldInputs

CPU = torch.device("cpu")


class Pooled(nn.Module):
    """(B, 1, D, H, W) -> (B, 8): the volume average-pooled to 2³ voxels, times a learnable gain; NaN for the
    training forwards listed in ``nan_calls`` (counted from 0), or for every forward with ``always``."""

    feature_dim = 8

    def __init__(self, nan_calls=(), always=False):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.nan_calls, self.always, self.calls = set(nan_calls), always, 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gain * F.adaptive_avg_pool3d(x, 2).flatten(1)  # (B, 1, D, H, W) -> (B, 8)
        if self.training:
            self.calls += 1
        if self.always or (self.training and self.calls - 1 in self.nan_calls):
            out = out * float("nan")
        return out


def fold(backbone: Pooled, n_train: int = 16) -> FoldInputs:
    g = torch.Generator().manual_seed(0)
    y = np.arange(n_train + 16) % 2
    volumes = (
        torch.rand(len(y), 1, 8, 8, 8, generator=g) + torch.as_tensor(y, dtype=torch.float32)[:, None, None, None, None]
    )
    return FoldInputs(
        volumes=volumes,
        make_backbone=lambda: backbone,
        train_idx=np.arange(n_train),
        val_idx=np.arange(n_train, n_train + 8),
        test_idx=np.arange(n_train + 8, len(y)),
        y=y,
        kind="classification",
        n_classes=2,
        seed=0,
        features_key="test",
        fold=3,
    )


def config(**kwargs) -> tuple[TrainConfig, OptimConfig]:
    """The (train, optim) settings a mode takes."""
    kwargs = {"epochs": 4, "batch_size": 4, "lr": 1e-2, "warmup_epochs": 0, "patience": 10, **kwargs}
    optim = {k: kwargs.pop(k) for k in [f.name for f in dataclasses.fields(OptimConfig)] if k in kwargs}
    return TrainConfig(precision="fp32", device="cpu", **kwargs), OptimConfig(**optim)


def test_a_nan_step_is_skipped_and_counted_and_leaves_no_nan_behind():
    backbone = Pooled(nan_calls={1, 5, 6})  # 4 steps per epoch: two steps of the first epoch, one more later
    kept = {}
    inputs = fold(backbone)
    inputs.on_fitted = lambda model: kept.update(model.state_dict())
    val_out, test_out, info = full.fit_predict_full(inputs, *config())
    assert info["nonfinite_skipped"] == 3 and info["epochs_run"] == 4
    assert np.isfinite(val_out).all() and np.isfinite(test_out).all()
    assert all(torch.isfinite(v).all() for v in kept.values() if v.is_floating_point())  # head BatchNorm included
    assert kept["backbone.gain"] != 1.0  # the finite steps trained


def test_ten_nan_steps_in_a_row_stop_the_fold_with_advice():
    backbone = Pooled(always=True)
    with pytest.raises(full.TrainingDiverged, match="fold 3: the training loss was NaN/Inf for 10 steps in a row") as e:
        full.fit_predict_full(fold(backbone), *config())
    assert "train.precision=fp32" in str(e.value) and "lower optim.lr" in str(e.value)
    assert backbone.calls == 10  # stopped at the tenth, not at the end of the fold


def test_a_fold_shorter_than_the_streak_with_no_finite_step_is_an_error_too():
    with pytest.raises(full.TrainingDiverged, match="fold 3: the training loss was NaN/Inf at every step \\(4\\)"):
        full.fit_predict_full(fold(Pooled(always=True)), *config(epochs=1))


def test_lp_ft_on_nan_features_says_so_instead_of_scikit_learns_message():
    inputs = fold(Pooled(always=True))
    model = FineTuneModel(inputs.make_backbone(), 2)
    with pytest.raises(full.TrainingDiverged, match="fold 3: LP-FT .* NaN/Inf for 24 of 24") as e:
        full.init_head_from_probe(model, inputs, inputs.y, batch_size=4, device=CPU, precision="fp32", l2=[1.0])
    assert "train.head_init=random" in str(e.value)


def test_the_cli_ends_with_one_error_line(ad_cohort, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(FineTuneModel, "forward", lambda self, x: torch.full((len(x), 2), float("nan")))
    overrides = ["train.mode=full", "train.epochs=12", "train.batch_size=4", "train.precision=fp32", "protocol.folds=2"]
    overrides += ["model.backbone=vit_tiny_p16", "model.kwargs={patch_size: 8, depth: 1}", "data.shape=[16,16,16]"]
    overrides += ["data.num_workers=0", "classical_pool=0"]
    argv = ["run", "--task", "ad", "--manifest", str(ad_cohort), "--out", str(tmp_path / "run"), *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: fold 0: the training loss was NaN/Inf for 10 steps in a row")
    assert not (tmp_path / "run").exists()  # the cell's folder is written only when it finishes
