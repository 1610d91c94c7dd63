"""The whole experiment at the smallest size: every stage runs, the report has every table, a rerun skips all."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from common.checkpoint import read_export_metadata
from common.config import load_config, to_object
from common.errors import ConfigError
from finetune.cli import main
from finetune.experiment import Experiment, ExperimentConfig, run_experiment

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "experiment" / "smoke.yaml"


def _config(out: Path, *overrides: str) -> ExperimentConfig:
    return to_object(load_config(ExperimentConfig, SMOKE, [f"out_dir={out}", *overrides]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.chdir(ROOT)  # recipes are named relative to the repository, as in the README
    out = tmp_path_factory.mktemp("experiment")
    # as a user runs it: python -m finetune experiment --config ... --out ...
    assert main(["experiment", "--config", str(SMOKE), "--out", str(out)]) == 0
    return _config(out), out, out / "report.md"


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_every_stage_wrote_its_outputs(finished):
    cfg, out, report = finished
    for task in ("ad", "pd", "brain_age"):
        manifest = pd.read_csv(out / "data" / f"cohort_{task}" / "manifest.csv")
        assert len(manifest) == 12 and set(manifest["site"]) == {"site0", "site1"}
    assert len(pd.read_csv(out / "data" / "synthmri" / "manifest.csv")) == 4
    assert len(list((out / "data" / "video").glob("*.mp4"))) == 2
    for spec in cfg.pretrain:
        meta = read_export_metadata(out / "pretrain" / spec.name / "export" / "encoder.safetensors")
        assert meta["step"] == 2 and meta["corpus"] == spec.corpus
    results = pd.read_csv(out / "finetune" / "in_site" / "results.csv")
    # 3 tasks x (vit: scratch + 2 MAE inits, cnn: scratch + SimCLR) x 2 fractions
    assert len(results) == 3 * 5 * 2
    assert set(results["init"]) == {"scratch", "synthmri_mae", "video_mae", "synthmri_simclr"}
    ood = pd.read_csv(out / "finetune" / "out_of_site" / "results.csv")
    assert len(ood) == 3 * 5 and (ood["fraction"] == 1.0).all()


def test_report_has_the_tables_and_plots(finished):
    _, out, report = finished
    text = report.read_text()
    for heading in ("## Pre-training", "## In-site results", "### Gain of each pre-trained init over scratch",
                    "## Out-of-site results", "### ad", "### pd", "### brain_age", "## What this can and cannot"):
        assert heading in text
    assert "Classical baseline (linear model on pooled voxels)" in text  # next to the trivial one
    assert "| scratch | roc_auc | classical |" in text  # paired gains against the classical baseline
    assert "| synthmri_mae | roc_auc | scratch |" in text  # and against scratch
    for line in text.splitlines():
        if line.startswith("!["):
            assert (out / line.split("](")[1].rstrip(")")).is_file()
    assert "synthmri_simclr" in text and "video_mae" in text


def test_rerun_skips_every_finished_stage(finished, caplog):
    cfg, out, _ = finished
    before = (out / "finetune" / "in_site" / "results.csv").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="finetune.experiment"):
        run_experiment(cfg)
    skipped = [r.message for r in caplog.records if "skipped" in r.message]
    assert len(skipped) == len(Experiment(cfg).stages()) - 1  # all but the report
    assert (out / "finetune" / "in_site" / "results.csv").stat().st_mtime_ns == before


def test_unfinished_pretraining_is_not_taken_for_done(finished):
    cfg, out, _ = finished
    exp = Experiment(cfg)
    spec = cfg.pretrain[0]
    assert exp._pretrain_done(spec)
    spec.overrides = [*spec.overrides, "train.steps=3"]
    assert not exp._pretrain_done(spec)


def test_config_errors_name_the_problem(tmp_path):
    cfg = _config(tmp_path)
    cfg.pretrain[0].backbone = "nope"
    with pytest.raises(ConfigError, match="backbone 'nope'"):
        Experiment(cfg)
    cfg = _config(tmp_path)
    cfg.pretrain[0].corpus = "medical"
    with pytest.raises(ConfigError, match="corpus must be synthmri or video"):
        Experiment(cfg)
    with pytest.raises(ConfigError, match="needs synth.ldm_model"):
        Experiment(_config(tmp_path, "synth.corpus_backend=ldm"))
    with pytest.raises(ConfigError, match="synth.cohorts"):
        Experiment(_config(tmp_path, "synth.cohorts.ms.n=3"))
    cfg = _config(tmp_path)
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert not Experiment(cfg).stages()[0].done()
