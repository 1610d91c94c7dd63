"""The whole experiment at the smallest size: every stage runs, the report has every table, a rerun skips all."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from common.checkpoint import read_export_metadata
from experiment.cli import main
from experiment.config import ExperimentConfig, load_experiment_config
from experiment.report import gains_over_scratch
from experiment.stages import Experiment, run_experiment

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "experiment" / "smoke.yaml"


def _config(out: Path, *overrides: str) -> ExperimentConfig:
    return load_experiment_config(SMOKE, [f"out_dir={out}", *overrides])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.chdir(ROOT)  # recipes are named relative to the repository, as in the README
    out = tmp_path_factory.mktemp("experiment")
    # as a user runs it: python -m experiment --config ... --out ...
    assert main(["--config", str(SMOKE), "--out", str(out)]) == 0
    return _config(out), out, out / "report.md"


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.slow
def test_every_stage_wrote_its_outputs(finished):
    cfg, out, report = finished
    for task in ("ad", "pd", "brain_age"):
        manifest = pd.read_csv(out / "data" / f"cohort_{task}" / "manifest.csv")
        assert len(manifest) == 12 and set(manifest["site"]) == {"site0", "site1"}
    assert len(pd.read_csv(out / "data" / "synthmri" / "manifest.csv")) == 4
    assert all(
        set(json.loads((out / f).read_text())) == {"ad", "pd", "brain_age"} for f in ("oracle.json", "domain_gap.json")
    )
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


def _column(text: str, header: str) -> list[str]:
    """The cells under the column whose heading contains ``header``, in every table of ``text``."""
    cells, col = [], None
    for line in text.splitlines():
        row = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if row is None:
            col = None
        elif col is None:
            col = next((i for i, c in enumerate(row) if header in c), None)
        elif not set(row[0]) <= set("-"):
            cells.append(row[col])
    return cells


@pytest.mark.slow
def test_report_shows_finite_numbers_and_its_images(finished):
    _, out, report = finished
    text = report.read_text()
    for heading in (
        "## Oracle ceiling",
        "## Domain gap",
        "## In-site results",
        "### Gain of each pre-trained init over scratch",
        "## Out-of-site",
    ):
        assert heading in text
    gains = _column(text, "gain (95 % CI)")  # "+0.041 [-0.020, +0.100]" per paired comparison
    primary = [c for c in _column(text, "(95 % CI)") if c not in gains]  # "0.812 [0.601, 0.950] ★" per cell
    # tasks x (backbone, init) x fractions, + out-of-site, + each cohort's oracle ceiling
    assert len(primary) == 3 * 5 * 2 + 3 * 5 + 3
    assert all(math.isfinite(float(cell.split()[0])) for cell in primary), primary
    assert gains and all(math.isfinite(float(g.split()[0])) for g in gains), gains
    assert set(_column(text, "verdict")) == {"too_few"}  # 12 subjects: below the 20 a verdict needs
    assert "`too_few`: no verdict — fewer than 20 test subjects" in text
    images = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert images, "the report shows no plot"
    for image in images:
        assert (out / image).read_bytes()[:4] == b"\x89PNG" and (out / image).stat().st_size > 1000
    assert "Classical baseline (linear model on pooled voxels)" in text  # next to the trivial one
    assert "| scratch | roc_auc | classical |" in text  # paired gains against the classical baseline
    assert "| synthmri_mae | roc_auc | scratch |" in text  # and against scratch
    assert "synthmri_simclr" in text and "video_mae" in text


@pytest.mark.slow
def test_rerun_skips_every_finished_stage(finished, caplog):
    cfg, out, _ = finished
    before = (out / "finetune" / "in_site" / "results.csv").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="experiment.stages"):
        run_experiment(cfg)
    skipped = [r.message for r in caplog.records if "skipped" in r.message]
    assert len(skipped) == len(Experiment(cfg).stages()) - 1  # all but the report
    assert (out / "finetune" / "in_site" / "results.csv").stat().st_mtime_ns == before


@pytest.mark.slow
def test_unfinished_pretraining_is_not_taken_for_done(finished):
    cfg = copy.deepcopy(finished[0])  # the module's config is shared: change a copy
    assert Experiment(cfg)._pretrain_done(cfg.pretrain[0])
    cfg.pretrain[0].overrides = [*cfg.pretrain[0].overrides, "train.steps=3"]  # a rerun asking for longer
    assert not Experiment(cfg)._pretrain_done(cfg.pretrain[0])


def test_a_missing_output_is_not_done(tmp_path):
    cfg = _config(tmp_path)
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert not Experiment(cfg).stages()[0].done()


def test_a_falling_mae_is_a_positive_gain_and_a_rising_auc_too():
    summary = pd.DataFrame(
        {
            "task": ["brain_age"] * 2 + ["ad"] * 2,
            "backbone": "vit",
            "fraction": 1.0,
            "init": ["scratch", "mae"] * 2,
            "primary": ["mae"] * 2 + ["roc_auc"] * 2,
            "higher_is_better": [False] * 2 + [True] * 2,
            "mae": [6.0, 4.5, None, None],
            "roc_auc": [None, None, 0.6, 0.8],
        }
    )
    gains = gains_over_scratch(summary).set_index("task")["gain"]
    assert gains["brain_age"] == pytest.approx(1.5) and gains["ad"] == pytest.approx(0.2)
