"""The benchmark grid end to end at tiny size, through the CLI: results, report, plots, TensorBoard, resume."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import finetune.grid
import finetune.run
from common.checkpoint import export_backbone
from common.errors import ConfigError
from common.models import create_backbone
from finetune.cli import main
from finetune.config import GridBackbone, GridConfig, InitEntry
from finetune.grid import expand
from finetune.report import markdown

GRID_YAML = """
tasks:
  ad: {ad}
  brain_age: {age}
backbones:
  - {{label: vit, name: vit_tiny_p16, kwargs: {{patch_size: 8, depth: 1}}}}
inits:
  - {{name: scratch, spec: scratch}}
  - {{name: pretrained, spec: {export}}}
fractions: [0.5, 1.0]
seeds: [0]
base:
  data: {{shape: [16, 16, 16], num_workers: 0}}
  train: {{mode: linear}}
  protocol: {{folds: 2}}
  bootstrap: 50
"""


@pytest.mark.slow
def test_benchmark_grid_runs_end_to_end_and_resumes(ad_cohort, age_cohort, tmp_path, capsys, monkeypatch):
    calls = {"load_volumes": 0, "prepare": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(finetune.run, "load_volumes", counted("load_volumes", finetune.run.load_volumes))
    monkeypatch.setattr(finetune.grid, "prepare", counted("prepare", finetune.grid.prepare))
    encoder = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1)
    export = export_backbone(encoder, tmp_path / "encoder.safetensors", {"spacing": [2, 2, 2], "intensity": "zscore"})
    config = tmp_path / "grid.yaml"
    config.write_text(GRID_YAML.format(ad=ad_cohort, age=age_cohort, export=export))
    out = tmp_path / "grid"
    assert main(["benchmark", "--config", str(config), "--out", str(out)]) == 0

    results = pd.read_csv(out / "results.csv")
    assert len(results) == 2 * 2 * 2  # tasks × inits × fractions (one backbone, one seed)
    assert calls == {"load_volumes": 2, "prepare": 8}  # each task's images read once, each cell prepared once
    assert set(results["init"]) == {"scratch", "pretrained"}
    assert np.isfinite(results.loc[results.task == "ad", ["roc_auc", "roc_auc_lo", "roc_auc_hi"]]).all(axis=None)
    assert np.isfinite(results.loc[results.task == "brain_age", ["mae", "mae_lo", "mae_hi"]]).all(axis=None)
    report = (out / "results.md").read_text()
    assert "## ad" in report and "## brain_age" in report and report.count("★") >= 4
    assert "Trivial baseline" in report
    assert "| vit |" in capsys.readouterr().out
    for png in ("ad_roc_auc_vs_fraction.png", "brain_age_mae_vs_fraction.png", "ad_per_site.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert list((out / "tb").glob("events.out.tfevents.*"))
    cell = out / "cells/ad/vit/pretrained/frac0.5/seed0"
    assert {"splits.csv", "predictions.csv", "metrics.json", "config.yaml", "weights_report.json"} <= {
        p.name for p in cell.iterdir()
    }
    assert json.loads((cell / "weights_report.json").read_text())["loaded"]

    # resumable: finished cells are skipped, a new seed adds only its cells
    done = cell.parent.parent / "frac1/seed0/metrics.json"
    stamps = (cell / "metrics.json").stat().st_mtime_ns, done.stat().st_mtime_ns
    assert main(["benchmark", "--config", str(config), "--out", str(out), "seeds=[0,1]", "fractions=[1.0]"]) == 0
    assert ((cell / "metrics.json").stat().st_mtime_ns, done.stat().st_mtime_ns) == stamps
    assert (cell.parent.parent / "frac1/seed1/metrics.json").is_file()
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 2 * 2 * 2 and set(results["seed"]) == {0, 1}


def test_benchmark_config_errors_name_the_key(tmp_path, capsys):
    config = tmp_path / "grid.yaml"
    config.write_text("tasks: {ad: nowhere.csv}\ninits: [{name: x, spec: 'timm2d:/no/such.pth'}]\n")
    assert main(["benchmark", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "/no/such.pth" in capsys.readouterr().err
    assert main(["benchmark", "--config", str(config), "--out", str(tmp_path / "o"), "base.trian.epochs=1"]) == 2
    assert "trian" in capsys.readouterr().err


def test_init_overrides_apply_after_the_backbone_overrides(tmp_path):
    cfg = GridConfig(
        tasks={"ad": "cohort/manifest.csv"},
        backbones=[GridBackbone("vit", "vit_tiny_p16", overrides=["optim.lr=0.001", "optim.layer_decay=1.0"])],
        inits=[InitEntry(name="scratch"), InitEntry(name="mae", overrides=["optim.layer_decay=0.75"])],
    )
    by_init = {cell.init: cell.cfg.optim for cell in expand(cfg, tmp_path)}
    assert (by_init["scratch"].lr, by_init["scratch"].layer_decay) == (0.001, 1.0)
    assert (by_init["mae"].lr, by_init["mae"].layer_decay) == (0.001, 0.75)
    cfg.inits[1].overrides = ["optim.layer_dacay=0.75"]
    with pytest.raises(ConfigError, match="init 'mae'.*layer_dacay"):
        expand(cfg, tmp_path)


def test_the_best_mark_goes_to_the_lowest_mae_and_the_highest_auc():
    rows = [("brain_age", "mae", False, init, value) for init, value in (("scratch", 5.0), ("mae", 3.0))]
    rows += [("ad", "roc_auc", True, init, value) for init, value in (("scratch", 0.7), ("mae", 0.9))]
    columns = ["task", "primary", "higher_is_better", "init", "value"]
    summary = pd.DataFrame(rows, columns=columns).assign(backbone="vit", mode="full", fraction=1.0, n_seeds=1)
    summary["mae"] = summary["value"].where(summary["primary"] == "mae")
    summary["roc_auc"] = summary["value"].where(summary["primary"] == "roc_auc")
    starred = [line for line in markdown(summary).splitlines() if "★" in line and line.startswith("|")]
    assert len(starred) == 2 and all("| mae |" in line for line in starred)
    assert any("3.000 ★" in line for line in starred) and any("0.900 ★" in line for line in starred)


def test_a_cells_overrides_keep_a_path_with_dollar_braces_literal():
    from finetune.config import RunConfig
    from finetune.grid import _with_overrides

    run = _with_overrides(RunConfig(manifest="/data/${oops}/m.csv"), ["optim.lr=0.001"], "vit", "scratch")
    assert run.manifest == "/data/${oops}/m.csv" and run.optim.lr == 0.001
