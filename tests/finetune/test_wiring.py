"""The wiring between the unit-tested parts of a cell: which rows, images and weights each step is handed.

Most tests replace the training mode by a stand-in that records what it was given and returns chosen outputs,
so the cell's own steps (classical baseline, trivial baseline, decision threshold, splits) can be checked
against the folds in ``splits.csv`` in a fraction of a second per fold.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from common.checkpoint import export_backbone
from common.errors import DataError
from common.models import create_backbone
from finetune import classical
from finetune.config import RunConfig
from finetune.metrics import youden_threshold
from finetune.modes import MODES, FoldInputs, linear_probe
from finetune.run import prepare, run_cell

TINY_VIT = {"patch_size": 8, "depth": 1}


def cell_config(manifest, task: str = "ad", **protocol) -> RunConfig:
    cfg = RunConfig(task=task, manifest=str(manifest), bootstrap=20)
    cfg.model.backbone, cfg.model.kwargs = "vit_tiny_p16", dict(TINY_VIT)
    cfg.data.shape, cfg.data.num_workers = [16, 16, 16], 0
    cfg.train.mode, cfg.train.batch_size, cfg.train.device, cfg.train.precision = "linear", 8, "cpu", "fp32"
    cfg.protocol.folds = 3
    for key, value in protocol.items():
        setattr(cfg.protocol, key, value)
    return cfg


def stand_in_mode(monkeypatch, output):
    """Replace the linear mode by one that records its ``FoldInputs`` and returns ``output(inputs, rows, split)``
    for the validation and test rows."""
    calls = []

    def mode(inputs, train_cfg, optim):
        calls.append(inputs)
        return output(inputs, inputs.val_idx, "val"), output(inputs, inputs.test_idx, "test"), {}

    monkeypatch.setitem(MODES, "linear", mode)
    return calls


def probabilities(p1: np.ndarray) -> np.ndarray:
    return np.column_stack([1 - p1, p1])


def subjects_of(prep, rows) -> set[str]:
    return set(prep.data.df["subject_id"].astype(str).to_numpy()[rows])


def fold_side(splits: pd.DataFrame, fold: int, side: str) -> set[str]:
    return set(splits.loc[(splits["fold"] == fold) & (splits["split"] == side), "subject_id"].astype(str))


# ----------------------------------------------------------------------- pre-training overlap
def _corpus_manifest(folder, images) -> str:
    """A pre-training manifest of byte copies of ``images`` (new names, as a synthetic corpus would hold them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        shutil.copy(image, folder / f"corpus-{i}.nii.gz")
    pd.DataFrame({"path": [f"corpus-{i}.nii.gz" for i in range(len(images))]}).to_csv(folder / "m.csv", index=False)
    return str(folder / "m.csv")


@pytest.mark.parametrize("scheme", ["kfold", "holdout"])
def test_prepare_refuses_a_test_image_of_any_fold_that_is_in_a_pretraining_manifest(make_cohort, tmp_path, scheme):
    other = make_cohort(tmp_path / "other", "ad", n_subjects=4, seed=9)  # images the cohort does not hold
    manifest = make_cohort(tmp_path / "c", "ad", n_subjects=12)
    cfg = cell_config(manifest, scheme=scheme, test_fraction=0.3)
    prep = prepare(cfg)
    # k-fold: a subject tested in the last fold, not in fold 0; hold-out: a test subject, never a training one
    subject = prep.folds[-1].test[0]
    image = prep.data.df.loc[prep.data.df["subject_id"] == subject, "path"].iloc[0]
    clean = [other.parent / "images" / f"sub-{i:03d}_ses-0.nii.gz" for i in range(4)]
    cfg.protocol.pretrain_manifests = [_corpus_manifest(tmp_path / "clean", clean)]
    prepare(cfg)  # a corpus of other images passes
    cfg.protocol.pretrain_manifests.append(_corpus_manifest(tmp_path / "leak", [*clean[:2], image]))
    with pytest.raises(DataError, match=f"test image {image} is byte-identical"):
        prepare(cfg)


# ----------------------------------------------------------------------- classical baseline rows
def test_the_classical_baseline_trains_on_the_fractions_training_subjects_only(ad_cohort, tmp_path, monkeypatch):
    calls = stand_in_mode(monkeypatch, lambda inputs, rows, split: probabilities(np.full(len(rows), 0.5)))
    fitted = []
    real = classical.fit_predict
    monkeypatch.setattr(classical, "_FITS", {})
    monkeypatch.setattr(
        classical, "fit_predict", lambda x, y, kind, *rows: fitted.append(rows) or real(x, y, kind, *rows)
    )
    cfg = cell_config(ad_cohort)
    cfg.fraction = 0.5
    prep = prepare(cfg)
    run_cell(cfg, tmp_path / "run", prep)
    splits = pd.read_csv(tmp_path / "run" / "splits.csv", dtype={"subject_id": str})
    assert len(fitted) == len(calls) == len(prep.folds) == 3
    for fold, inputs, (train, val, test) in zip(prep.folds, calls, fitted):
        np.testing.assert_array_equal(train, inputs.train_idx)  # the rows the model trains on
        assert subjects_of(prep, train) == fold_side(splits, fold.fold, "train")
        assert fold_side(splits, fold.fold, "unused")  # the fraction left training subjects out ...
        assert not subjects_of(prep, train) & fold_side(splits, fold.fold, "unused")  # ... and so did the baseline
        assert subjects_of(prep, val) == fold_side(splits, fold.fold, "val")
        assert subjects_of(prep, test) == fold_side(splits, fold.fold, "test")


# ----------------------------------------------------------------------- what the caches key on
def _export(path, seed: int) -> str:
    torch.manual_seed(seed)
    model = create_backbone("vit_tiny_p16", img_size=16, in_chans=1, **TINY_VIT)
    export_backbone(model, path, {"input_size": [16] * 3, "spacing": [2.0] * 3, "intensity": "zscore"})
    return str(path)


def test_linear_probe_features_are_cached_per_init_weights(ad_cohort, tmp_path, monkeypatch):
    """Two inits on the same images (two exports, and scratch) each get their own features; the same init
    again is a cache hit. A key without the weights would hand every init the first one's features."""
    monkeypatch.setattr(linear_probe, "_FEATURES", {})  # this test's cache only
    extracted = []
    real = linear_probe.extract_features
    monkeypatch.setattr(linear_probe, "extract_features", lambda *a, **k: extracted.append(1) or real(*a, **k))
    cache = tmp_path / "cache"
    inits = {"a": _export(tmp_path / "a.safetensors", 1), "b": _export(tmp_path / "b.safetensors", 2)}
    inits["scratch"] = "scratch"

    def run(name: str, init: str) -> pd.DataFrame:
        cfg = cell_config(ad_cohort, folds=2)
        cfg.init, cfg.cache_dir, cfg.classical_pool = init, str(cache), 0
        run_cell(cfg, tmp_path / name)
        return pd.read_csv(tmp_path / name / "predictions.csv")

    predictions = {name: run(name, init) for name, init in inits.items()}
    assert len(extracted) == 3  # one extraction per init: no init got another's features
    features = [torch.load(p) for p in sorted(cache.glob("features-*.pt"))]
    assert len(features) == 3
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(features[i], features[j])
    assert not np.allclose(predictions["a"]["prob_1"], predictions["b"]["prob_1"])
    linear_probe._FEATURES.clear()  # a new process: the disk cache answers
    again = run("a-again", inits["a"])
    assert len(extracted) == 3  # the same init's features came from the cache
    np.testing.assert_allclose(again["prob_1"], predictions["a"]["prob_1"])


def test_linear_probe_features_are_cached_per_precision(ad_cohort, tmp_path, monkeypatch):
    """bf16 features are not fp32 features: a fp32 run after a bf16 one on the same init extracts its own (else its
    predictions are the bf16 run's, and its saved model does not reproduce them)."""
    monkeypatch.setattr(linear_probe, "_FEATURES", {})
    extracted = []
    real = linear_probe.extract_features
    monkeypatch.setattr(linear_probe, "extract_features", lambda *a, **k: extracted.append(a[-1]) or real(*a, **k))
    for precision in ("bf16", "fp32", "bf16"):
        cfg = cell_config(ad_cohort, folds=2)
        cfg.train.precision, cfg.cache_dir, cfg.classical_pool = precision, str(tmp_path / "cache"), 0
        run_cell(cfg, tmp_path / precision, overwrite=True)
    assert extracted == ["bf16", "fp32"] and len(list((tmp_path / "cache").glob("features-*.pt"))) == 2


def test_classical_fits_are_shared_only_by_the_same_voxels_labels_and_rows(monkeypatch):
    """A grid's cells share a classical fit when voxels, labels and fold rows agree; a smaller training fraction
    (other training rows) or another task's labels is a fit of its own."""
    monkeypatch.setattr(classical, "_FITS", {})
    fits = []
    real = classical.fit_select
    monkeypatch.setattr(classical, "fit_select", lambda *a, **k: fits.append(1) or real(*a, **k))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 12))
    y = (x[:, 0] + rng.normal(0, 0.5, 30) > 0).astype(int)
    train, val, test = np.arange(16), np.arange(16, 23), np.arange(23, 30)
    first = classical.fit_predict(x, y, "classification", train, val, test)
    second = classical.fit_predict(x.copy(), y.copy(), "classification", train.copy(), val, test)
    assert len(fits) == 1  # the same inputs: one fit
    np.testing.assert_array_equal(first[1], second[1])
    half = classical.fit_predict(x, y, "classification", train[::2], val, test)
    assert len(fits) == 2 and not np.allclose(half[1], first[1])  # a fraction's subset is fitted on its own rows
    flipped = classical.fit_predict(x, 1 - y, "classification", train, val, test)
    assert len(fits) == 3 and not np.allclose(flipped[1], first[1])
    classical.fit_predict(x + 1.0, y, "classification", train, val, test)
    assert len(fits) == 4


# ----------------------------------------------------------------------- linear probe strength
def test_the_linear_probe_chooses_its_strength_on_the_folds_validation_rows(monkeypatch):
    """Validation rows follow the training relation, test rows hold the training mean (which only the strongest
    ridge predicts): the probe must keep the validation's best alpha and predict each side's own rows."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 40)) * rng.uniform(0.5, 3, 40)  # more features than the 36 training rows
    x[:, 7] = 4.0
    y = x[:, :10] @ rng.normal(size=10) + rng.normal(0, 0.5, 60)
    train, val, test = np.arange(36), np.arange(36, 48), np.arange(48, 60)
    y[test] = y[train].mean()
    monkeypatch.setattr(linear_probe, "cached_features", lambda *a: torch.as_tensor(x))
    inputs = FoldInputs(None, None, train, val, test, y, "regression", 0, 0, "")
    cfg = SimpleNamespace(batch_size=1, device="cpu", precision="fp32", probe_l2=[1e-3, 1.0, 1e7])
    val_out, test_out, info = linear_probe.fit_predict_linear(inputs, cfg)
    assert info["probe_l2"] == 1.0  # validation MAE 1.45 (1e-3: 1.56, 1e7: 3.7)
    assert info["val_score"] == pytest.approx(-np.mean(np.abs(val_out - y[val])))
    assert np.mean(np.abs(test_out - y[test])) > 1.0  # alpha 1e7 would predict these almost exactly


# ----------------------------------------------------------------------- decision threshold
def test_the_youden_threshold_is_fitted_on_each_folds_validation_rows(ad_cohort, tmp_path, monkeypatch):
    """Validation probabilities separate the classes around 0.2 + 0.05·fold, test ones around 0.6: each fold's
    cut is its validation cut, so every test subject is called positive (specificity 0). A cut fitted on the test
    rows would separate them perfectly."""

    def output(inputs, rows, split):
        base = 0.1 + 0.05 * inputs.fold if split == "val" else 0.5
        return probabilities(base + 0.2 * inputs.y[rows])

    stand_in_mode(monkeypatch, output)
    cfg = cell_config(ad_cohort, val_fraction=0.4)
    result = run_cell(cfg, tmp_path / "run")
    for name in ("predictions.csv", "classical_predictions.csv"):
        table = pd.read_csv(tmp_path / "run" / name)
        for fold, part in table.groupby("fold"):
            val = part[part["split"] == "val"]
            assert len(val) >= 5 and val["y_true"].nunique() == 2  # enough to fit a cut on
            assert part["threshold"].nunique() == 1
            assert part["threshold"].iloc[0] == pytest.approx(youden_threshold(val["y_true"], val["prob_1"]))
            if name == "predictions.csv":
                assert part["threshold"].iloc[0] == pytest.approx(0.2 + 0.05 * fold)
    assert result["metrics"]["roc_auc"] == 1.0
    assert result["metrics"]["sensitivity"] == 1.0 and result["metrics"]["specificity"] == 0.0


# ----------------------------------------------------------------------- trivial baseline
def test_the_trivial_baseline_predicts_the_mean_age_of_each_folds_training_subjects(age_cohort, tmp_path, monkeypatch):
    stand_in_mode(monkeypatch, lambda inputs, rows, split: np.full(len(rows), 70.0))
    cfg = cell_config(age_cohort, task="brain_age")
    cfg.fraction, cfg.classical_pool = 0.5, 0
    prep = prepare(cfg)
    result = run_cell(cfg, tmp_path / "run", prep)
    splits = pd.read_csv(tmp_path / "run" / "splits.csv", dtype={"subject_id": str})
    age = pd.Series(prep.data.y, index=prep.data.df["subject_id"].astype(str))

    def mae(train_side) -> float:
        errors = []
        for fold in prep.folds:
            mean = age[list(train_side(fold.fold))].mean()
            errors += list(np.abs(age[list(fold_side(splits, fold.fold, "test"))] - mean))
        return float(np.mean(errors))

    expected = mae(lambda k: fold_side(splits, k, "train"))
    assert result["baseline"]["mae"] == pytest.approx(expected, rel=1e-9)
    # the means this is told apart from: the whole training pool, the test rows, every row
    pool = mae(lambda k: fold_side(splits, k, "train") | fold_side(splits, k, "unused"))
    tested = mae(lambda k: fold_side(splits, k, "test"))
    every = mae(lambda k: set(age.index))
    for other in (pool, tested, every):
        assert abs(other - expected) > 1e-3


# ----------------------------------------------------------------------- repeated k-fold
def test_repeated_kfold_reshuffles_each_repeat(ad_cohort):
    prep = prepare(cell_config(ad_cohort, repeats=3))
    assert [f.fold for f in prep.folds] == list(range(9))
    subjects = set(prep.data.df["subject_id"].astype(str))
    partitions = []
    for r in range(3):
        tests = [frozenset(map(str, f.test)) for f in prep.folds[3 * r : 3 * r + 3]]
        assert set().union(*tests) == subjects and sum(map(len, tests)) == len(subjects)  # each subject once
        partitions.append(frozenset(tests))
    assert len(set(partitions)) == 3, "repeats made the same folds"
