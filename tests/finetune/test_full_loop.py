"""The full fine-tuning loop (``finetune.modes.full.fit_predict_full``) on a backbone whose features are known:
the best validation epoch after warm-up is the one restored, predictions are made in eval mode, the loss
balances the classes, nothing about the test subjects' ages reaches training, and an LP-FT head starts at the
linear probe of the ages in years."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import Ridge
from torch import nn

from finetune.config import OptimConfig, TrainConfig
from finetune.heads import FineTuneModel
from finetune.modes import full
from finetune.modes.common import FoldInputs

CPU = torch.device("cpu")


class Pooled(nn.Module):
    """(B, 1, D, H, W) -> (B, 8): the volume average-pooled to 2³ voxels, times a learnable gain. No
    normalisation layer, so with lr 0 nothing in it changes."""

    feature_dim = 8

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * F.adaptive_avg_pool3d(x, 2).flatten(1)  # (B, 1, D, H, W) -> (B, 8)


def fold(volumes: torch.Tensor, y: np.ndarray, n_train: int, n_val: int, **kwargs) -> FoldInputs:
    """Rows in order: the first ``n_train`` train, the next ``n_val`` validate, the rest test."""
    classification = y.dtype.kind == "i"
    n = len(y)
    return FoldInputs(
        volumes=volumes,
        make_backbone=Pooled,
        train_idx=np.arange(n_train),
        val_idx=np.arange(n_train, n_train + n_val),
        test_idx=np.arange(n_train + n_val, n),
        y=y,
        kind="classification" if classification else "regression",
        n_classes=int(y.max()) + 1 if classification else 0,
        seed=0,
        features_key="test",
        **kwargs,
    )


def config(**kwargs) -> tuple[TrainConfig, OptimConfig]:
    """The (train, optim) settings a mode takes."""
    kwargs = {"epochs": 10, "batch_size": 8, "lr": 1e-2, "warmup_epochs": 0, "patience": 3, **kwargs}
    optim = {k: kwargs.pop(k) for k in [f.name for f in dataclasses.fields(OptimConfig)] if k in kwargs}
    return TrainConfig(precision="fp32", device="cpu", **kwargs), OptimConfig(**optim)


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, 8, generator=torch.Generator().manual_seed(seed))


def scripted_validation(monkeypatch, scores: list[float]) -> list[dict]:
    """Make epoch e's validation score ``scores[e]``; returns the model's state at each validation."""
    states = []

    def validate(model, *args):
        states.append(copy.deepcopy(model.state_dict()))
        return scores[len(states) - 1], 0.0

    monkeypatch.setattr(full, "_validate", validate)
    return states


def fitted_state(inputs: FoldInputs) -> list[dict]:
    """Set ``inputs.on_fitted`` to keep the state of the model that predicts."""
    fitted = []
    inputs.on_fitted = lambda model: fitted.append(copy.deepcopy(model.state_dict()))
    return fitted


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def classification_fold(**kwargs) -> FoldInputs:
    y = np.array([0, 1] * 16, dtype=np.int64)
    volumes = noise(32) + torch.as_tensor(y, dtype=torch.float32).reshape(-1, 1, 1, 1, 1)  # the class, visible
    return fold(volumes, y, n_train=16, n_val=8, **kwargs)


def test_the_best_validation_epoch_is_restored_not_the_last(monkeypatch):
    """Epoch 3 scores best, then three epochs do not improve (patience 3): training stops after epoch 6 and
    the model that predicts is epoch 3's."""
    states = scripted_validation(monkeypatch, [0.5, 0.6, 0.7, 0.9, 0.8, 0.85, 0.8, 0.99, 0.99, 0.99])
    inputs = classification_fold()
    fitted = fitted_state(inputs)
    _, _, info = full.fit_predict_full(inputs, *config())
    assert (info["best_epoch"], info["epochs_run"], info["val_score"]) == (3, 7, 0.9)
    assert len(states) == 7 and len(fitted) == 1
    with pytest.raises(AssertionError):  # training went on after the best epoch: restoring it matters
        assert_same_state(fitted[0], states[6])
    assert_same_state(fitted[0], states[3])


def test_warm_up_epochs_are_never_kept_as_the_best(monkeypatch):
    """A lucky score during the 2 warm-up epochs is no candidate: the best epoch is the best one after them."""
    states = scripted_validation(monkeypatch, [0.95, 0.9, 0.6, 0.7, 0.65, 0.6, 0.6, 0.6, 0.6, 0.6])
    inputs = classification_fold()
    fitted = fitted_state(inputs)
    _, _, info = full.fit_predict_full(inputs, *config(warmup_epochs=2))
    assert (info["best_epoch"], info["epochs_run"], info["val_score"]) == (3, 7, 0.7)
    assert_same_state(fitted[0], states[3])


def test_predict_runs_in_eval_mode_whatever_mode_the_model_is_in():
    """Dropout and a batch-statistics head would make train-mode outputs random and batch-dependent."""
    torch.manual_seed(0)
    model = FineTuneModel(Pooled(), 2, dropout=0.5, norm="batch")
    volumes, idx = noise(10), np.array([7, 1, 4, 0, 9, 2])
    model.train()(volumes)  # running statistics away from their initial values
    out = full.predict(model.train(), volumes, idx, batch_size=4, device=CPU, precision="fp32")
    with torch.no_grad():
        expected = model.eval()(volumes[idx])
    torch.testing.assert_close(out, expected)


def test_returned_predictions_are_the_fitted_models_in_eval_mode():
    inputs = classification_fold()
    fitted = []
    inputs.on_fitted = lambda model: fitted.append(copy.deepcopy(model))
    val_out, test_out, _ = full.fit_predict_full(inputs, *config(epochs=3, head_dropout=0.5))
    model = fitted[0].eval()
    with torch.no_grad():
        probs = torch.softmax(model(inputs.volumes), dim=1).numpy()
    np.testing.assert_allclose(val_out, probs[inputs.val_idx], atol=1e-6)
    np.testing.assert_allclose(test_out, probs[inputs.test_idx], atol=1e-6)


def test_class_weights_balance_an_imbalanced_training_set():
    """Blank images (nothing tells the classes apart: the head sees zero features and only its bias learns),
    training classes 4:1. The inverse-frequency weighted loss is smallest at equal probabilities, so the model
    stays there; unweighted it would learn the prior (0.8), weighted by the counts themselves 16/17."""
    y = np.array([0, 0, 0, 0, 1] * 12, dtype=np.int64)  # 40 training (32:8), 10 validation, 10 test rows
    volumes = torch.zeros(len(y), 1, 8, 8, 8)
    cfg = config(epochs=20, batch_size=40, lr=0.1)
    _, test_out, _ = full.fit_predict_full(fold(volumes, y, n_train=40, n_val=10), *cfg)
    np.testing.assert_allclose(test_out, 0.5, atol=0.01)
    cfg[0].class_weights = False  # the fixture shows the prior when nothing balances it
    _, test_out, _ = full.fit_predict_full(fold(volumes, y, n_train=40, n_val=10), *cfg)
    assert (test_out[:, 0] > 0.7).all()


def ages() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.r_[rng.uniform(50, 60, 32), rng.uniform(80, 90, 8)]  # test subjects decades older


def age_fold(y: np.ndarray, **kwargs) -> FoldInputs:
    """24 training, 8 validation and 8 test subjects whose volumes' first pooled voxel carries ``ages()``."""
    volumes = noise(len(y), seed=1)
    volumes[:, :, :4, :4, :4] += torch.as_tensor((ages() - 50) / 10, dtype=torch.float32).reshape(-1, 1, 1, 1, 1)
    return fold(volumes, y, n_train=24, n_val=8, **kwargs)


def test_the_test_subjects_ages_do_not_reach_training():
    """The regression target is standardised with the training rows' mean and spread: changing the test rows'
    ages changes no prediction."""
    y = ages()
    older = y.copy()
    older[32:] += 30
    assert abs(older.mean() - y.mean()) > 5 and abs(older.std() - y.std()) > 5  # the fixture shows a leak
    cfg = config(epochs=4)
    val_out, test_out, _ = full.fit_predict_full(age_fold(y), *cfg)
    val_again, test_again, _ = full.fit_predict_full(age_fold(older), *cfg)
    np.testing.assert_allclose(val_again, val_out, rtol=0, atol=1e-6)
    np.testing.assert_allclose(test_again, test_out, rtol=0, atol=1e-6)


def test_lp_ft_head_starts_at_the_ridge_probe_of_the_ages_in_years():
    """``head_init=probe`` with lr 0 and no normalisation anywhere: the predictions are the initial head's, which
    must be scikit-learn's ridge fitted on the training rows' standardised features and ages (in years), with
    the strength LP-FT chose."""
    y = ages()
    inputs = age_fold(y)
    cfg = config(epochs=1, lr=0.0, head_init="probe", head_norm="none")
    val_out, test_out, info = full.fit_predict_full(inputs, *cfg)
    feats = F.adaptive_avg_pool3d(inputs.volumes, 2).flatten(1).double().numpy()  # Pooled's features, gain 1
    tr = inputs.train_idx
    z = (feats - feats[tr].mean(0)) / feats[tr].std(0)
    ridge = Ridge(alpha=info["head_probe_l2"]).fit(z[tr], y[tr])
    np.testing.assert_allclose(val_out, ridge.predict(z[inputs.val_idx]), atol=1e-3)
    np.testing.assert_allclose(test_out, ridge.predict(z[inputs.test_idx]), atol=1e-3)
    assert np.corrcoef(val_out, y[inputs.val_idx])[0, 1] > 0.8  # the probe reads the planted age


def test_lp_ft_chooses_its_head_from_the_linear_probes_grid():
    """``train.probe_l2`` is LP-FT's grid too: a one-penalty grid is the penalty its head starts from, and another
    grid starts another head."""
    inputs = age_fold(ages())
    starts = {}
    for l2 in (0.5, 5e4):
        cfg = config(epochs=1, lr=0.0, head_init="probe", head_norm="none", probe_l2=[l2])
        val_out, _, info = full.fit_predict_full(inputs, *cfg)
        assert info["head_probe_l2"] == l2
        starts[l2] = val_out
    assert np.abs(starts[0.5] - starts[5e4]).max() > 1.0  # 5e4 shrinks the ridge towards the mean age


@pytest.mark.parametrize(
    "random_scores, probe_scores, chosen, best",
    [
        ([0.6, 0.95, 0.7, 0.6], [0.8, 0.9, 0.85, 0.8], "random", 1),  # random's epoch 1
        ([0.6, 0.7, 0.65, 0.6], [0.8, 0.6, 0.9, 0.8], "probe", 4 + 2),  # probe's epoch 2, after random's 4
    ],
)
def test_choose_keeps_the_head_start_that_validates_better(monkeypatch, random_scores, probe_scores, chosen, best):
    """``head_init=choose`` trains the fold from a random head, then from the probe (patience 9: every epoch runs),
    and keeps the run whose best validation score is higher, at its best epoch; only that model predicts the test
    rows, once. Scripted so that each start wins once."""
    states = scripted_validation(monkeypatch, random_scores + probe_scores)
    inputs = classification_fold()
    tested, unpatched = [], full.predict

    def predict(model, volumes, idx, *args):
        if idx is inputs.test_idx:
            tested.append(model)
        return unpatched(model, volumes, idx, *args)

    monkeypatch.setattr(full, "predict", predict)
    fitted = []
    inputs.on_fitted = lambda model: fitted.append((model, copy.deepcopy(model.state_dict())))
    _, _, info = full.fit_predict_full(inputs, *config(epochs=4, patience=9, head_init="choose"))
    assert info["head_init"] == chosen
    assert info["head_val_scores"] == {"random": max(random_scores), "probe": max(probe_scores)}
    assert len(states) == 8 and len(fitted) == 1
    assert_same_state(fitted[0][1], states[best])
    assert tested == [fitted[0][0]]  # the test rows were predicted once, by the kept model


def test_choose_predicts_what_the_chosen_head_start_alone_predicts():
    """The two runs of ``choose`` are the runs each start makes alone (same seed, rows, batch order, augmentation
    and dropout draws): the kept model's predictions and weights equal the chosen start's run on its own, and the
    other start's recorded score is what it scores alone."""
    inputs = classification_fold(augment=True)
    cfg = dict(epochs=3, head_dropout=0.3, head_norm="batch")
    fitted = fitted_state(inputs)
    val_out, test_out, info = full.fit_predict_full(inputs, *config(head_init="choose", **cfg))
    alone = {}
    for start in ("random", "probe"):
        torch.manual_seed(123)  # a process's random stream before the run: each run must draw from its own seed
        again = classification_fold(augment=True)
        state = fitted_state(again)
        alone[start] = (*full.fit_predict_full(again, *config(head_init=start, **cfg)), state[0])
    val_alone, test_alone, info_alone, state_alone = alone[info["head_init"]]
    np.testing.assert_array_equal(test_out, test_alone)
    np.testing.assert_array_equal(val_out, val_alone)
    assert_same_state(fitted[0], state_alone)
    assert {k: v for k, v in info.items() if k != "head_val_scores"} == info_alone
    assert info["head_val_scores"] == {start: alone[start][2]["val_score"] for start in alone}
