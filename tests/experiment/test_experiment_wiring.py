"""What the experiment hands its fine-tuning grids: the pre-training corpus's manifest, so that a cohort image the
encoder saw in pre-training is refused before any cell trains, in-site and out-of-site."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import finetune.grid
from common.errors import DataError
from experiment.config import load_experiment_config
from experiment.stages import Experiment

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "experiment" / "smoke.yaml"


def _cohort(folder: Path, n: int = 12, sites: int = 2) -> pd.DataFrame:
    """A tiny AD cohort as ``synth cohort`` writes it: noise images, alternating diagnoses, sites in pairs."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        name = f"images/sub-{i:03d}.nii.gz"
        nib.save(
            nib.Nifti1Image(rng.normal(1, 0.3, (8, 8, 8)).astype(np.float32), np.diag([8.0] * 3 + [1])), folder / name
        )
        site, diagnosis = f"site{(i // 2) % sites}", "AD" if i % 2 else "CN"
        rows.append(
            {"path": name, "subject_id": f"sub-{i:03d}", "site": site, "dataset": "tiny", "diagnosis": diagnosis}
        )
    df = pd.DataFrame(rows)
    df.to_csv(folder / "manifest.csv", index=False)
    return df


def test_both_grids_refuse_a_cohort_image_that_is_in_the_pretraining_corpus(tmp_path, monkeypatch):
    cfg = load_experiment_config(SMOKE, [f"out_dir={tmp_path / 'exp'}"])
    cfg.synth.cohorts = {"ad": cfg.synth.cohorts["ad"]}
    cfg.pretrain, cfg.grid.backbones = [], cfg.grid.backbones[:1]  # scratch on one backbone: nothing to pre-train
    exp = Experiment(cfg)
    cohort = _cohort(exp.cohort_dir("ad"))
    # the corpus holds a byte copy of sub-003, a subject of the held-out site (tested in-site and out-of-site)
    assert cohort.set_index("subject_id").loc["sub-003", "site"] in cfg.ood_sites
    exp.corpus_dir().mkdir(parents=True)
    shutil.copy(exp.cohort_dir("ad") / "images/sub-003.nii.gz", exp.corpus_dir() / "synth-0.nii.gz")
    pd.DataFrame({"path": ["synth-0.nii.gz"]}).to_csv(exp.corpus_dir() / "manifest.csv", index=False)
    monkeypatch.setattr(finetune.grid, "run_cell", lambda *a, **k: pytest.fail("a cell trained on a leaking cohort"))
    stages = {stage.name: stage for stage in exp.stages()}
    for name in ("finetune:in_site", "finetune:out_of_site"):
        with pytest.raises(
            DataError, match=r"sub-003.nii.gz is byte-identical to pre-training image \S*synth-0.nii.gz"
        ):
            stages[name].run()
