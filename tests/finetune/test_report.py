"""What people read of a grid: confidence intervals rounded (full precision kept in the files), plots with units
and the number of training subjects."""

from __future__ import annotations

import re

import pandas as pd
import pytest

import finetune.report
from finetune.cli import main
from finetune.report import write_report


def _results() -> pd.DataFrame:
    """Two brain-age cells at two label budgets (20 and 40 training subjects per fold), unrounded numbers."""
    rows = []
    for fraction, n_train, mae in ((0.5, 20.0, 6.123456789), (1.0, 40.0, 4.987654321)):
        rows.append(
            {
                **{"task": "brain_age", "backbone": "vit", "init": "scratch", "fraction": fraction, "seed": 0},
                **{"mode": "linear", "primary": "mae", "higher_is_better": False, "n_train_subjects": n_train},
                **{"mae": mae, "mae_lo": mae - 0.7654321, "mae_hi": mae + 0.8765432, "run_dir": f"c{fraction}"},
            }
        )
    return pd.DataFrame(rows)


def test_results_md_rounds_the_intervals_and_results_csv_keeps_every_digit(tmp_path):
    write_report(_results(), tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "| 4.988 [4.222, 5.864] ★ |" in text and "6.123 [5.358, 7.000]" in text
    assert not re.search(r"\d\.\d{4}", text)  # no number with more than 3 decimals
    assert pd.read_csv(tmp_path / "results.csv")["mae"].iloc[0] == pytest.approx(6.123456789, abs=1e-12)


def test_the_learning_curve_shows_years_over_training_subjects(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(finetune.report.plt, "close", figures.append)  # keep the figure to read its axes
    write_report(_results(), tmp_path)
    ax = figures[0].axes[0]
    assert ax.get_ylabel() == "MAE (years)"
    assert ax.get_xlabel() == "training subjects (per fold)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["20", "40"]
    assert (tmp_path / "plots" / "brain_age_mae_vs_fraction.png").read_bytes()[:4] == b"\x89PNG"


def test_the_run_commands_summary_line_rounds_its_interval(ad_cohort, tmp_path, capsys):
    args = ["run", "--task", "ad", "--manifest", str(ad_cohort), "--backbone", "resnet18", "--mode", "linear"]
    settings = ["model.kwargs={widen_factor: 0.25}", "data.shape=[16,16,16]", "data.num_workers=0"]
    settings += ["protocol.folds=2", "bootstrap=20", "classical_pool=0", "train.device=cpu", "train.precision=fp32"]
    assert main([*args, "--out", str(tmp_path / "run"), *settings]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r"roc_auc = \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \(trivial baseline \d\.\d{3}\)", line), line
