"""Each fold's fine-tuned model is saved as a model folder, and ``finetune predict`` applies it: on the run's own
test rows it gives the run's predictions.csv (to 1e-5); a run folder of k folds gives their mean."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from finetune.cli import main
from finetune.config import RunConfig
from finetune.model_folder import read_model_folder
from finetune.run import run_cell

TOLERANCE = 1e-5


def cell(manifest, task: str, mode: str, scheme: str, **protocol) -> RunConfig:
    cfg = RunConfig(task=task, manifest=str(manifest), bootstrap=10, classical_pool=0)
    cfg.model.backbone, cfg.model.kwargs = "vit_tiny_p16", {"patch_size": 8, "depth": 1}
    cfg.data.shape, cfg.data.num_workers = [16, 16, 16], 0
    cfg.train.mode, cfg.train.epochs, cfg.train.batch_size = mode, 2, 4
    cfg.train.device, cfg.train.precision = "cpu", "fp32"
    cfg.protocol.scheme = scheme
    for key, value in protocol.items():
        setattr(cfg.protocol, key, value)
    return cfg


def predict(model, manifest, rows: pd.DataFrame, out) -> pd.DataFrame:
    """``finetune predict`` through its CLI on the manifest's rows of ``rows``' subjects."""
    scans = pd.read_csv(manifest)
    scans = scans[scans["subject_id"].isin(rows["subject_id"])]
    scans.to_csv(manifest.parent / "scans.csv", index=False)
    assert (
        main(["predict", "--model", str(model), "--manifest", str(manifest.parent / "scans.csv"), "--out", str(out)])
        == 0
    )
    return pd.read_csv(out)


def assert_reproduces(run: pd.DataFrame, predicted: pd.DataFrame, columns: list[str]) -> None:
    both = run.merge(predicted, on=["subject_id", "session_id"], suffixes=("", "_predicted"), validate="1:1")
    assert len(both) == len(run) == len(predicted)
    assert (both["y_true"] == both["y_true_predicted"]).all()
    for column in columns:
        np.testing.assert_allclose(both[f"{column}_predicted"], both[column], atol=TOLERANCE, rtol=0, err_msg=column)


@pytest.mark.parametrize("task, mode", [("ad", "full"), ("ad", "lora"), ("brain_age", "full")])
def test_a_hold_out_saves_model_and_predict_reproduces_its_test_predictions(request, tmp_path, task, mode):
    manifest = request.getfixturevalue("ad_cohort" if task == "ad" else "age_cohort")
    run_cell(cell(manifest, task, mode, "holdout", val_fraction=0.3), tmp_path / "run")
    folder = tmp_path / "run" / "model"
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "head.safetensors", "config.json", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    assert config["fine_tuning"]["mode"] == mode and config["task"]["name"] == task
    assert config["preprocessing"]["crop_foreground"] is True and config["preprocessing"]["intensity"] == "zscore"
    for name in ("config.json", "README.md"):  # a model folder is shared by copying it
        assert str(tmp_path) not in (folder / name).read_text()
    assert "predict --model model" in (folder / "README.md").read_text()

    run = pd.read_csv(tmp_path / "run" / "predictions.csv")
    test = run[run["split"] == "test"]
    predicted = predict(tmp_path / "run", manifest, test, tmp_path / "predictions.csv")
    if task == "ad":
        assert config["task"]["classes"] == ["CN", "AD"] and 0 < config["task"]["threshold"] < 1
        assert_reproduces(test, predicted, ["prob_0", "prob_1", "threshold"])
        decided = np.where(predicted["prob_1"] > predicted["threshold"], "AD", "CN")
        assert (predicted["predicted"] == decided).all()
    else:  # the head predicts z-scores of the training ages: the folder keeps their mean and SD
        assert config["task"]["target_std"] > 1 and 55 < config["task"]["target_mean"] < 85
        assert_reproduces(test, predicted, ["y_pred", "y_pred_corrected"])


def test_each_kfold_model_reproduces_its_folds_test_rows_and_the_run_folder_averages_them(age_cohort, tmp_path):
    run_cell(cell(age_cohort, "brain_age", "linear", "kfold", folds=2, val_fraction=0.4), tmp_path / "run")
    run = pd.read_csv(tmp_path / "run" / "predictions.csv")
    per_fold = []
    for fold in (0, 1):
        folder = tmp_path / "run" / f"fold{fold}" / "model"
        test = run[(run["fold"] == fold) & (run["split"] == "test")]
        assert_reproduces(
            test, predict(folder, age_cohort, test, tmp_path / f"p{fold}.csv"), ["y_pred", "y_pred_corrected"]
        )
        per_fold.append(predict(folder, age_cohort, run, tmp_path / f"all{fold}.csv"))
    assert run["y_pred_corrected"].notna().any()  # a bias correction was fitted and is reproduced
    assert not (tmp_path / "run" / "model").exists()  # k folds: one model each, none for the run as a whole

    mean = predict(tmp_path / "run", age_cohort, run, tmp_path / "mean.csv")
    np.testing.assert_allclose(mean["y_pred"], (per_fold[0]["y_pred"] + per_fold[1]["y_pred"]) / 2, rtol=1e-12)


def test_the_model_folder_is_a_plain_backbone_and_head(ad_cohort, tmp_path):
    """LoRA's adapters are merged: the backbone's keys are the unadapted model's, loadable without peft."""
    run_cell(cell(ad_cohort, "ad", "lora", "holdout"), tmp_path / "run")
    fitted = read_model_folder(tmp_path / "run" / "model")
    assert not any("lora_" in k or "base_layer" in k for k in fitted.model.backbone.state_dict())
    assert fitted.preprocess.shape == (16, 16, 16) and fitted.task["head"] == {
        "norm": "batch",
        "out_dim": 2,
        "dtype": "float32",
    }


def test_predict_refuses_an_encoder_export_and_a_folder_without_models(ad_cohort, tmp_path, capsys):
    from common.export import export_folder
    from common.models import create_backbone

    encoder = export_folder(
        create_backbone("resnet18", img_size=16), tmp_path / "enc", {"spacing": [2.0] * 3, "intensity": "zscore"}
    )
    (tmp_path / "empty").mkdir()
    for model, problem in ((encoder, "an encoder export without a task head"), (tmp_path / "empty", "neither a model")):
        args = ["predict", "--model", str(model), "--manifest", str(ad_cohort), "--out", str(tmp_path / "p.csv")]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert re.match(r"error: .*" + problem, err) and err.count("\n") == 1
    assert not (tmp_path / "p.csv").exists()
