"""One cell end to end, the checks that stop bad input before training, and the optimiser set-up."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from common.config import load_config, to_object
from common.errors import CheckpointError, ConfigError, DataError
from common.models import create_backbone
from finetune.config import RunConfig
from finetune.heads import FineTuneModel, LinearHead
from finetune.modes import full, linear_probe
from finetune.run import MODES, _correct_bias, check_run_folder, run_cell

TINY_VIT = {"patch_size": 8, "depth": 1}


def tiny_config(task: str, manifest, mode: str = "linear", **protocol) -> RunConfig:
    cfg = RunConfig(task=task, manifest=str(manifest), bootstrap=50)
    cfg.model.backbone, cfg.model.kwargs = "vit_tiny_p16", dict(TINY_VIT)
    cfg.data.shape, cfg.data.num_workers = [16, 16, 16], 0
    cfg.train.mode, cfg.train.epochs, cfg.train.batch_size = mode, 1, 4
    cfg.protocol.folds = 3
    for key, value in protocol.items():
        setattr(cfg.protocol, key, value)
    return cfg


def test_linear_probe_cell_writes_splits_and_predictions(ad_cohort, tmp_path, monkeypatch):
    cfg = tiny_config("ad", ad_cohort, repeats=2)
    result = run_cell(cfg, tmp_path / "run")
    splits = pd.read_csv(tmp_path / "run/splits.csv")
    assert list(splits.columns) == ["subject_id", "fold", "split"]
    assert splits.groupby(["fold", "subject_id"]).size().max() == 1  # one side per subject and fold
    assert sorted(splits["fold"].unique()) == list(range(6))
    predictions = pd.read_csv(tmp_path / "run/predictions.csv")
    test = predictions[predictions["split"] == "test"]
    assert len(test) == 2 * 24 and test.groupby("fold")["subject_id"].nunique().sum() == 48
    assert {"prob_0", "prob_1", "y_true", "site"} <= set(predictions.columns)
    assert result["baseline"]["roc_auc"] == 0.5  # the trivial predictor
    assert result["metrics"]["roc_auc"] > 0.8, result["metrics"]  # the blob radius differs by class: far above chance
    assert result["metrics"]["roc_auc_lo"] > 0.5
    assert (tmp_path / "run/metrics.json").is_file() and any((tmp_path / "run/tb").iterdir())

    # features are cached on disk: a second run with a fresh process cache does not run the backbone
    linear_probe._FEATURES.clear()
    monkeypatch.setattr(linear_probe, "extract_features", lambda *a, **k: pytest.fail("features recomputed"))
    cfg.cache_dir = str(tmp_path / "run/cache")
    run_cell(cfg, tmp_path / "again")


def test_bias_correction_is_fitted_on_validation_and_only_applied_to_test():
    """Validation and test predictions share the slope but test is shifted by +5 years: the correction fitted on
    validation leaves that shift (10 years after dividing by the slope); one fitted on test would erase it."""
    age = np.linspace(50, 80, 10)
    val = pd.DataFrame({"y_true": age, "y_pred": 0.5 * age + 30})
    test = pd.DataFrame({"y_true": age[::-1], "y_pred": 0.5 * age[::-1] + 35})
    _correct_bias(val, test)
    np.testing.assert_allclose(val["y_pred_corrected"], age)
    np.testing.assert_allclose(test["y_pred_corrected"], test["y_true"] + 10)
    flat = pd.DataFrame({"y_true": age, "y_pred": 0.1 * age + 60})  # no age trend to invert: not reported
    _correct_bias(flat, test)
    assert test["y_pred_corrected"].isna().all()


def test_linear_probe_brain_age_on_a_planted_trend_reports_a_finite_corrected_mae(age_cohort, tmp_path):
    result = run_cell(tiny_config("brain_age", age_cohort, folds=2, val_fraction=0.3), tmp_path / "run")
    test = pd.read_csv(tmp_path / "run/predictions.csv").query("split == 'test'")
    assert test["y_pred_corrected"].notna().all()  # every fold's validation predictions carry the age trend
    m = result["metrics"]
    assert np.isfinite(m["mae_corrected"]) and m["mae"] < result["baseline"]["mae"]
    assert m["pearson_r"] > 0.5


def test_full_fine_tuning_brain_age_reports_raw_and_corrected_mae(age_cohort, tmp_path):
    cfg = tiny_config("brain_age", age_cohort, mode="full", folds=2, val_fraction=0.3)
    result = run_cell(cfg, tmp_path / "run")
    predictions = pd.read_csv(tmp_path / "run/predictions.csv")
    assert {"y_pred", "y_pred_corrected"} <= set(predictions.columns)
    assert {"mae", "mae_corrected", "rmse", "pearson_r", "r2"} <= set(result["metrics"])
    assert result["folds"][0]["epochs_run"] == 1


def test_layer_wise_lr_decay_and_no_decay_groups():
    model = FineTuneModel(create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=2), 2)
    groups = full.param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    lr = lambda name: lr_of[id(named[name])]
    assert lr("backbone.patch_embed.proj.weight")[0] == pytest.approx(0.5**3)
    assert lr("backbone.blocks.0.attn.qkv.weight")[0] == pytest.approx(0.5**2)
    assert lr("backbone.blocks.1.attn.qkv.weight")[0] == pytest.approx(0.5)
    assert lr("head.fc.weight") == (1.0, 0.05)
    assert lr("backbone.cls_token")[1] == 0 and lr("backbone.blocks.0.norm1.weight")[1] == 0


@pytest.fixture
def broken_cohort(tmp_path, make_cohort):
    return make_cohort(tmp_path / "c", "ad", n_subjects=8)


def _assert_nothing_trained(out):
    assert not (out / "splits.csv").exists() and not (out / "tb").exists()


def test_missing_or_corrupt_image_fails_before_training(broken_cohort, tmp_path):
    images = broken_cohort.parent / "images"
    (images / "sub-003_ses-0.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(DataError, match="sub-003_ses-0.nii.gz.*cannot be read as NIfTI"):
        run_cell(tiny_config("ad", broken_cohort), tmp_path / "out")
    _assert_nothing_trained(tmp_path / "out")
    (images / "sub-003_ses-0.nii.gz").unlink()
    with pytest.raises(DataError, match="manifest.csv.*not found.*sub-003_ses-0.nii.gz"):
        run_cell(tiny_config("ad", broken_cohort), tmp_path / "out")


def test_label_column_problems_fail_with_the_column_named(broken_cohort, tmp_path):
    df = pd.read_csv(broken_cohort)
    df.drop(columns="age").to_csv(broken_cohort, index=False)
    with pytest.raises(DataError, match="manifest.csv.*needs column 'age'"):
        run_cell(tiny_config("brain_age", broken_cohort), tmp_path / "out")
    df.assign(diagnosis="CN").to_csv(broken_cohort, index=False)
    with pytest.raises(DataError, match="'diagnosis' has 1 class.*needs CN and AD"):
        run_cell(tiny_config("ad", broken_cohort), tmp_path / "out")
    _assert_nothing_trained(tmp_path / "out")


def test_init_of_the_wrong_kind_fails_before_training(broken_cohort, tmp_path):
    image = next((broken_cohort.parent / "images").iterdir())
    cfg = tiny_config("ad", broken_cohort)
    cfg.init = f"timm2d:{image}"
    with pytest.raises(CheckpointError, match=f"{image.name}: a gzip file.*not a weight file"):
        run_cell(cfg, tmp_path / "out")
    cfg.init = f"videomae:{tmp_path / 'nowhere.pth'}"
    with pytest.raises(CheckpointError, match="nowhere.pth.*does not exist"):
        run_cell(cfg, tmp_path / "out")
    _assert_nothing_trained(tmp_path / "out")


def test_batch_norm_head_ignores_what_all_subjects_share():
    """The head sees each feature standardised over the batch: a shared offset and scale (registered brains
    share most of a pooled feature) change nothing, while without it they dominate the logits."""
    torch.manual_seed(0)
    feats = torch.randn(8, 16)
    shared = 50.0 * torch.randn(16)
    batch_head, plain_head = LinearHead(16, 2, norm="batch"), LinearHead(16, 2, norm="none")
    torch.testing.assert_close(batch_head(3.0 * feats + shared), batch_head(feats), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain_head(feats + shared), plain_head(feats), atol=1e-2)
    with pytest.raises(ValueError, match="^norm must be one of"):
        LinearHead(16, 2, norm="layer")


def test_early_stopping_ignores_warm_up_epochs():
    """A lucky validation score while the lr warms up is not kept, and does not stop the run before the model
    has learnt (the PD runs of docs/results.md stopped at epoch 21 with epoch 0 as their best before this)."""
    scores = [0.9, 0.4, 0.5, 0.45, 0.7, 0.6, 0.65, 0.6]
    selector = full.EpochSelector(first=2, patience=3)
    decisions = [selector.update(epoch, (score, 0.0)) for epoch, score in enumerate(scores)]
    assert [best for best, _ in decisions] == [False, False, True, False, True, False, False, False]
    assert [stop for _, stop in decisions].index(True) == 7 and selector.best_epoch == 4
    assert full.EpochSelector(first=0, patience=3).update(0, (0.9, 0.0)) == (True, False)


def test_labels_the_task_does_not_know_are_named_unless_the_config_drops_them(make_cohort, tmp_path):
    manifest = make_cohort(tmp_path / "c", "ad", n_subjects=12)
    df = pd.read_csv(manifest)
    df.loc[[0, 1], "diagnosis"], df.loc[2, "diagnosis"] = "MCI", "Alzheimer"
    df.to_csv(manifest, index=False)
    with pytest.raises(DataError, match=r"does not know: 'Alzheimer', 'MCI' on 3 rows \(CSV lines 2, 3, 4\)"):
        run_cell(tiny_config("ad", manifest), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    cfg = tiny_config("ad", manifest)
    cfg.drop_labels = ["MCI", "Alzheimer"]
    result = run_cell(cfg, tmp_path / "out")
    assert result["dropped_labels"] == {"Alzheimer": 1, "MCI": 2}
    assert len(pd.read_csv(tmp_path / "out" / "predictions.csv").query("split == 'test'")) == len(df) - 3


def test_a_finished_run_folder_is_kept_unless_overwrite_replaces_it_whole(broken_cohort, tmp_path):
    out = tmp_path / "out"
    first = run_cell(tiny_config("ad", broken_cohort), out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = tiny_config("ad", broken_cohort)
    other.train.seed = 1
    with pytest.raises(ConfigError, match=f"{out}: holds a finished run.*--overwrite"):
        run_cell(other, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (out / "stray.txt").write_text("from the old run")
    assert run_cell(other, out, overwrite=True)["seed"] == 1 != first["seed"]
    assert not (out / "stray.txt").exists()  # replaced whole, not merged


def test_a_failed_run_leaves_no_folder_and_a_file_is_no_run_folder(broken_cohort, tmp_path, monkeypatch):
    def crash(inputs, cfg, optim):
        raise RuntimeError("late failure")

    monkeypatch.setitem(MODES, "linear", crash)
    with pytest.raises(RuntimeError, match="late failure"):
        run_cell(tiny_config("ad", broken_cohort), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # neither out/ nor a partial folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--out is a file"):
        run_cell(tiny_config("ad", broken_cohort), tmp_path / "file")


def test_cli_takes_overrides_after_option_flags_and_names_an_export_init(tmp_path):
    from common.config import parse_with_overrides
    from finetune.cli import _parser
    from finetune.run import check_init_path

    args = parse_with_overrides(_parser(), ["run", "train.epochs=1", "--out", "O", "train.seed=2", "--overwrite"])
    assert args.out == "O" and args.overwrite and args.overrides == ["train.epochs=1", "train.seed=2"]
    with pytest.raises(CheckpointError, match="names an export source"):
        check_init_path(str(tmp_path / "missing.safetensors"))


def test_on_equal_validation_auc_the_epoch_with_the_lower_loss_is_kept():
    """Two epochs rank the validation subjects alike (same AUC); the confident, lower-loss one must win."""
    y = np.array([0, 1, 0, 1, 0, 1])
    volumes = torch.tensor(y, dtype=torch.float32).reshape(-1, 1, 1, 1, 1)  # each volume holds its label
    inputs = full.FoldInputs(volumes, None, np.arange(0), np.arange(6), np.arange(0), y, "classification", 2, 0, "")
    cfg = SimpleNamespace(batch_size=4)
    decode = lambda out: torch.softmax(out, dim=1).numpy()

    class Epoch(torch.nn.Module):  # logits (c, -c) for label 0, (-c, c) for label 1: always ranked right
        def __init__(self, confidence):
            super().__init__()
            self.c = confidence

        def forward(self, x):
            x = x.reshape(len(x), 1)
            return self.c * torch.cat([1 - 2 * x, 2 * x - 1], dim=1)

    scores = [
        full._validate(Epoch(c), inputs, inputs.val_idx, decode, cfg, torch.device("cpu"), False)
        for c in (0.2, 3.0, 1.0)
    ]
    assert scores[0][0] == scores[1][0] == scores[2][0] == 1.0
    selector = full.EpochSelector(first=0, patience=5)
    assert [selector.update(e, s)[0] for e, s in enumerate(scores)] == [True, True, False]
    assert selector.best_epoch == 1


def test_an_unfinished_run_saved_before_the_config_keys_were_renamed_is_taken_up(tmp_path):
    """``run_config_before_one_vocabulary.yaml`` is a cell's ``config.yaml`` as the previous version saved it
    (``backbone.name``, top-level ``seed``, ``train.lr``, ``probe_c`` ...): the same settings in today's keys take
    the folder up; a different seed is still another run."""
    saved = Path(__file__).parent / "data" / "run_config_before_one_vocabulary.yaml"
    out = tmp_path / "cell"
    out.mkdir()
    (out / "config.yaml").write_text(saved.read_text())
    same = [
        "task=ad",
        "manifest=cohort/manifest.csv",
        "model.backbone=vit_tiny_p16",
        "model.kwargs={patch_size: 8, depth: 1}",
        "train.seed=3",
        "optim.lr=0.001",
        "train.epochs=2",
    ]
    check_run_folder(out, to_object(load_config(RunConfig, None, same)), overwrite=False)
    other = to_object(load_config(RunConfig, None, [*same, "train.seed=4"]))
    with pytest.raises(ConfigError, match=r"unfinished run with other settings \(train\)"):
        check_run_folder(out, other, overwrite=False)
