"""Cohorts from another generator than the corpus's (``synth.cohort_config``, ``synth.cohort_overrides``), cohorts
made only for their oracle ceiling (``finetune: false``), the oracle and domain-gap stages' cached results, and the
report's sections on them and on the head starts the cells kept."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from common.config import load_config, to_object
from common.errors import ConfigError
from experiment import stages
from experiment.config import load_experiment_config
from experiment.report import head_choices, write_experiment_report
from experiment.stages import Experiment
from synth.config import SynthConfig
from tests.experiment.test_oracle import cohort

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "experiment" / "smoke.yaml"


def _experiment(tmp_path: Path, *overrides: str) -> Experiment:
    return Experiment(load_experiment_config(SMOKE, [f"out_dir={tmp_path / 'exp'}", *overrides]))


def test_the_cohorts_take_their_own_synth_config_and_the_corpus_keeps_the_default(tmp_path):
    shifted = tmp_path / "shifted.yaml"
    shifted.write_text("spacing: 1.0\nintensity: {t1_gm: 0.40}\n")  # a synth YAML states a spacing of its own
    plain = _experiment(tmp_path)
    experiment = _experiment(
        tmp_path, f"synth.cohort_config={shifted}", "synth.cohort_overrides=[intensity.t1_wm=0.8]", "workers=1"
    )
    corpus, cohorts = experiment.synth_config(corpus=True), experiment.synth_config(corpus=False)
    assert corpus == plain.synth_config(corpus=True) and cohorts != plain.synth_config(corpus=False)
    default = SynthConfig().intensity
    assert (corpus.intensity.t1_gm, corpus.intensity.t1_wm) == (default.t1_gm, default.t1_wm) != (0.40, 0.8)
    assert (cohorts.intensity.t1_gm, cohorts.intensity.t1_wm) == (0.40, 0.8)
    assert cohorts.spacing == corpus.spacing == 8.0  # the experiment's spacing, not the file's
    # the hand-off: the YAML `python -m synth cohort` is given
    cmd = experiment._synth_cmd("cohort", False, "--task", "ad")
    handed = to_object(load_config(SynthConfig, cmd[cmd.index("--config") + 1]))
    assert handed == cohorts and (experiment.data / "synth_cohorts.yaml").is_file()


def test_what_the_experiment_sets_stays_its_own(tmp_path):
    with pytest.raises(ConfigError, match=r"synth.cohort_overrides sets spacing .*set spacing instead"):
        _experiment(tmp_path, "synth.cohort_overrides=[spacing=2]")
    with pytest.raises(ConfigError, match=r"synth.overrides sets contrast .*set synth.contrast instead"):
        _experiment(tmp_path, "synth.overrides=[contrast=random]")
    assert _experiment(tmp_path, "synth.cohort_overrides=[contrast=random]").synth_config(False).contrast == "random"
    with pytest.raises(ConfigError, match="synth.cohort_config: nope.yaml not found"):
        _experiment(tmp_path, "synth.cohort_config=nope.yaml")
    with pytest.raises(ConfigError, match=r"synth.cohort_overrides \['atrophy.max_mm=9'\]: .*atrophy.max_mm"):
        _experiment(tmp_path, "synth.cohort_overrides=[atrophy.max_mm=9]")


def test_an_oracle_only_cohort_is_generated_but_not_fine_tuned(tmp_path):
    # one site: no held-out site to test on, which an oracle-only cohort does not need
    experiment = _experiment(tmp_path, "synth.cohorts.pd={n: 12, sites: 1, finetune: false}")
    assert set(experiment.grid_config(ood=False).tasks) == set(experiment.grid_config(ood=True).tasks)
    assert set(experiment.grid_config(ood=False).tasks) == {"ad", "brain_age"}
    assert [s.name for s in experiment.stages()][:3] == ["corpus", "cohorts", "oracle"]
    with pytest.raises(ConfigError, match="no task to fine-tune"):
        _experiment(tmp_path, *(f"synth.cohorts.{t}.finetune=false" for t in ("ad", "pd", "brain_age")))


def test_the_oracle_stage_writes_every_cohorts_ceiling_once(tmp_path, monkeypatch):
    experiment = _experiment(tmp_path, "synth.cohorts.pd.finetune=false", "pretrain=[]")  # no exports to read
    for task, diagnoses in {"ad": ("CN", "AD"), "pd": ("HC", "PD"), "brain_age": ("CN", "CN")}.items():
        frame = cohort()
        frame["diagnosis"] = frame["diagnosis"].map({"CN": diagnoses[0], "AD": diagnoses[1]})
        experiment.cohort_dir(task).mkdir(parents=True)
        frame.to_csv(experiment.cohort_dir(task) / "manifest.csv", index=False)
    oracle = next(stage for stage in experiment.stages() if stage.name == "oracle")
    assert not oracle.done()
    oracle.run()
    ceilings = json.loads(experiment.oracle_file().read_text())
    assert set(ceilings) == {"ad", "pd", "brain_age"} and ceilings["brain_age"]["metric"] == "mae"
    assert ceilings["ad"]["value"] > 0.9 and ceilings["pd"]["value"] > 0.9  # the hippocampus separates both
    assert oracle.done()  # a resumed run does not recompute it
    experiment._report()
    text = (experiment.out / "report.md").read_text()
    assert "## Oracle ceiling: what a perfect volumetric pipeline reaches" in text
    assert "| pd | no (oracle only) | roc_auc |" in text and "no init is expected to gain above this ceiling" in text


def test_the_domain_gap_is_measured_once_per_cohort_and_reported(tmp_path, monkeypatch):
    """A gap already in domain_gap.json (from a run that was stopped) is not measured again; the report shows all."""
    measured = []

    def gap(corpus, cohort, seed):
        measured.append(Path(cohort).name)
        result = {"roc_auc": 0.75, "balanced_accuracy": 0.7, "folds": []}
        return {"n_a": 4, "n_b": 12, "voxels": result, "histogram": result}

    monkeypatch.setattr(stages, "domain_gap", gap)
    experiment = _experiment(tmp_path, "pretrain=[{name: mae, corpus: synthmri, backbone: vit}]")
    experiment.out.mkdir(parents=True)
    experiment.gap_file().write_text(json.dumps({"ad": gap("corpus", "cohort_ad", 0)}))
    measured.clear()
    stage = next(stage for stage in experiment.stages() if stage.name == "domain_gap")
    assert not stage.done()
    stage.run()
    assert measured == ["cohort_pd", "cohort_brain_age"] and stage.done()
    experiment.cfg.pretrain = []  # no exports to read; and without a corpus there is no gap stage
    assert "domain_gap" not in [s.name for s in Experiment(experiment.cfg).stages()]
    experiment._report()
    text = (experiment.out / "report.md").read_text()
    assert "## Domain gap between the pre-training corpus and each cohort" in text
    assert text.count("| 4 / 12 | 0.750 | 0.700 | 0.750 |") == 3


def _fold(head: str, scores: dict[str, float]) -> dict:
    return {"fold": 0, "head_init": head, "head_val_scores": scores, "val_score": max(scores.values())}


def test_the_report_counts_the_head_start_each_fold_kept(tmp_path):
    grid = tmp_path / "grid"
    cells = {  # run_dir -> (init, the starts its folds kept)
        "cells/a": ("scratch", ["random", "random"]),
        "cells/b": ("yaware", ["probe", "random"]),
        "cells/c": ("yaware", ["probe"]),
    }
    for run_dir, (_, kept) in cells.items():
        (grid / run_dir).mkdir(parents=True)
        folds = [_fold(k, {"random": 0.6, "probe": 0.7 if k == "probe" else 0.5}) for k in kept]
        (grid / run_dir / "metrics.json").write_text(json.dumps({"folds": folds}))
    metrics = {"fraction": 1.0, "seed": 0, "mode": "full", "primary": "roc_auc", "higher_is_better": True}
    pd.DataFrame(
        [
            {"task": "ad", "backbone": "vit", "init": i, "run_dir": d, **metrics, "roc_auc": 0.7}
            for d, (i, _) in cells.items()
        ]
    ).to_csv(grid / "results.csv", index=False)
    counts = head_choices(grid).set_index("init")
    assert counts.loc["scratch", ["random", "probe"]].tolist() == [2, 0]
    assert counts.loc["yaware", ["random", "probe"]].tolist() == [1, 2]
    cfg = load_experiment_config(SMOKE, [f"out_dir={tmp_path}", "pretrain=[]"])
    report = write_experiment_report(cfg, tmp_path, {}, {}, {"in_site": tmp_path / "none", "out_of_site": grid})
    assert "| out-of-site | ad | vit | yaware | 1 | 2 |" in report.read_text()


def test_the_shipped_shift_config_fine_tunes_ad_and_brain_age_on_its_cohort_generator():
    raw = yaml.safe_load((ROOT / "configs" / "experiment" / "transfer_shift.yaml").read_text())
    assert raw["synth"]["cohort_config"] == "configs/synth/shifted.yaml"
    assert raw["synth"]["cohorts"]["pd"]["finetune"] is False
    assert raw["grid"]["base"]["train"]["head_init"] == "choose"


def test_a_rescan_entry_needs_a_corpus_with_two_scans_per_subject(tmp_path, monkeypatch):
    rescan = (
        "pretrain=[{name: rescan, corpus: synthmri, config: configs/pretrain/quickstart.yaml, backbone: vit, "
        "overrides: [objective.name=simclr, objective.contrastive.views=rescan]}]"
    )
    with pytest.raises(ConfigError, match=r"pretrain entry 'rescan' asks for rescan views.*corpus_renderings: 2"):
        _experiment(tmp_path, rescan)
    experiment = _experiment(tmp_path, rescan, "synth.corpus_renderings=2")
    commands = []
    monkeypatch.setattr(stages, "_child", lambda cmd, log_file: commands.append(cmd))
    experiment._corpus()
    assert commands[0][commands[0].index("--renderings") + 1] == "2"
    with pytest.raises(ConfigError, match="corpus_renderings must be >= 1"):
        _experiment(tmp_path, "synth.corpus_renderings=0")
