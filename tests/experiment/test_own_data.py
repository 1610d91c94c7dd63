"""Your own cohorts, end to end: a BIDS tree made from a synthetic cohort (sessions, two runs of a session, an
``n/a`` age, study labels, an LPS and an anisotropic file) goes through ``python -m finetune manifest``, then a
tiny ``python -m experiment`` whose tasks are that manifest and whose encoder is pre-trained on a medical corpus
given as a manifest, then ``finetune run --init FOLDER`` with no backbone flags and ``finetune predict`` on
subjects the run never saw: each step exits 0 with the outputs the docs name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.experiment.bids_tree import bids_from_cohort

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """``bids/`` (24 subjects of an AD cohort over two sites at 8 mm) and ``corpus/`` (16 unlabelled volumes)."""
    root = tmp_path_factory.mktemp("study")
    common = ["--spacing", "8", "--workers", "2", "--no-progress"]
    _run(
        "synth",
        "cohort",
        "--task",
        "ad",
        "--out",
        str(root / "cohort"),
        "--n",
        "24",
        "--sites",
        "2",
        "--seed",
        "5",
        *common,
    )
    _run("synth", "generate", "--out", str(root / "corpus"), "--n", "16", "--seed", "0", *common)
    bids_from_cohort(root / "cohort", root / "bids")
    return root


@pytest.mark.slow
def test_a_bids_study_goes_through_manifest_and_the_experiment(study, tmp_path):
    manifest = tmp_path / "ad.tsv"
    out = _run(
        "finetune", "manifest", "--bids", str(study / "bids"), "--out", str(manifest), "--label-column", "group",
        "--label-map", "Control=CN,Dementia=AD",
    )  # fmt: skip
    assert "26 images of 24 subjects" in out  # two sessions of sub-04, two runs of sub-05; derivatives/ left out
    table = pd.read_csv(manifest, sep="\t")
    assert set(table["diagnosis"]) == {"CN", "AD"} and table["age"].isna().sum() == 1
    assert sorted(table.loc[table["subject_id"] == "sub-05", "run"]) == [1, 2]

    config = {
        "out_dir": str(tmp_path / "experiment"),
        "spacing": 8.0,
        "ood_sites": ["site1"],
        "cohorts": {"ad": str(manifest), "brain_age": str(manifest)},
        "pretrain": [
            {
                "name": "medical_mae",
                "corpus": "medical",
                "manifest": str(study / "corpus" / "manifest.csv"),
                "config": "configs/pretrain/quickstart.yaml",
                "backbone": "vit",
                "overrides": ["train.steps=4", "train.checkpoint_every=4", "train.image_every=0", "data.batch_size=2"],
            }
        ],
        "grid": {
            "backbones": [{"label": "vit", "name": "vit_tiny_p16", "kwargs": {"patch_size": 8, "depth": 1}}],
            "base": {
                "data": {"shape": [16, 24, 16], "intensity": "zscore", "num_workers": 0},
                "train": {"mode": "linear"},
                "protocol": {"folds": 2},
                "bootstrap": 50,
            },
        },
    }
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(config))
    out = _run("experiment", "--config", str(tmp_path / "experiment.yaml"))
    assert "left out 1 rows with an empty 'age'" in out  # brain age: the n/a subject is dropped and counted
    report = (tmp_path / "experiment" / "report.md").read_text()
    assert "your cohorts' tasks (ad, brain_age)" in report and "No synthetic pre-training corpus" in report
    results = pd.read_csv(tmp_path / "experiment" / "finetune" / "in_site" / "results.csv")
    assert set(results["task"]) == {"ad", "brain_age"} and set(results["init"]) == {"scratch", "medical_mae"}
    assert (tmp_path / "experiment" / "finetune" / "out_of_site" / "results.csv").is_file()
    assert not (tmp_path / "experiment" / "data" / "synthmri").exists()  # no synthetic corpus was made

    # the experiment's export alone rebuilds its encoder: no backbone flags, every tensor loaded (a partial load
    # would be refused); four subjects are kept out of the run and given to its model afterwards
    export = tmp_path / "experiment" / "pretrain" / "medical_mae" / "export"
    new = table["subject_id"].isin(["sub-21", "sub-22", "sub-23", "sub-24"])
    table[~new].to_csv(tmp_path / "seen.tsv", sep="\t", index=False)
    table[new].to_csv(tmp_path / "new.tsv", sep="\t", index=False)
    for name in ("seen.tsv", "new.tsv"):  # paths are relative to the manifest, which moved
        moved = pd.read_csv(tmp_path / name, sep="\t")
        moved["path"] = [str((manifest.parent / p).resolve()) for p in moved["path"]]
        moved.to_csv(tmp_path / name, sep="\t", index=False)
    run = tmp_path / "run"
    out = _run(
        "finetune", "run", "--task", "ad", "--manifest", str(tmp_path / "seen.tsv"), "--init", str(export),
        "--out", str(run), "train.epochs=2", "data.shape=[16,24,16]", "data.num_workers=0", "protocol.scheme=holdout",
        "bootstrap=50",
    )  # fmt: skip
    weights = json.loads((run / "weights_report.json").read_text())
    assert not weights.get("missing") and not weights.get("resized"), weights
    assert (run / "model" / "model.safetensors").is_file()
    _run(
        "finetune",
        "predict",
        "--model",
        str(run),
        "--manifest",
        str(tmp_path / "new.tsv"),
        "--out",
        str(tmp_path / "p.csv"),
    )
    predicted = pd.read_csv(tmp_path / "p.csv")
    assert sorted(predicted["subject_id"]) == ["sub-21", "sub-22", "sub-23", "sub-24"]
    assert predicted["prob_1"].between(0, 1).all() and set(predicted["predicted"]) <= {"CN", "AD"}
