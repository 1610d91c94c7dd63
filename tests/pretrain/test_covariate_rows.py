"""An objective that needs a covariate (y-aware: age) on a medical manifest: rows without a finite value are
dropped when the corpus is built, with a count in the log, and a manifest with none left is refused."""

import logging

import numpy as np
import pandas as pd
import pytest

from common.config import load_config
from common.errors import DataError
from pretrain.cli import main
from pretrain.config import PretrainConfig
from pretrain.corpora import CorpusStream, build_source, require_covariates
from tests.pretrain.conftest import tiny_config, write_yaml


def manifest_with_ages(nifti_dir, path, ages) -> str:
    files = [nifti_dir / "s1.nii.gz", nifti_dir / "s2.nii.gz", nifti_dir / "site2" / "s3.nii.gz"]
    pd.DataFrame({"path": [str(f) for f in files], "subject_id": ["a", "b", "c"], "age": ages}).to_csv(
        path, index=False
    )
    return str(path)


def medical(manifest: str) -> PretrainConfig:
    settings = {"data.medical.manifest": manifest, "data.shape": "[16,16,16]", "data.spacing": "[4,4,4]"}
    return load_config(PretrainConfig, None, ["corpus=medical"] + [f"{k}={v}" for k, v in settings.items()])


def test_rows_without_an_age_are_dropped_up_front_and_counted(nifti_dir, tmp_path, caplog):
    cfg = medical(manifest_with_ages(nifti_dir, tmp_path / "m.csv", [30, None, float("inf")]))
    source = build_source(cfg)
    with caplog.at_level(logging.WARNING, logger="pretrain.corpora.medical"):
        require_covariates(source, ("age",))
    assert [p.name for p in source.files] == ["s1.nii.gz"]
    assert "2 of 3 rows dropped: age empty or not a number" in caplog.text
    stream = CorpusStream(source, cfg.train.seed, batch_size=2, covariates=("age",))
    batch = next(iter(stream))
    assert np.allclose(batch["age"].numpy(), [30.0, 30.0])  # every item read has its age; none skipped


def test_a_manifest_without_any_age_is_refused_before_the_run_writes(nifti_dir, tmp_path, capsys):
    manifest = manifest_with_ages(nifti_dir, tmp_path / "m.csv", [None, None, None])
    with pytest.raises(DataError, match="no row has a number in age"):
        require_covariates(build_source(medical(manifest)), ("age",))
    objective = {"name": "yaware", "contrastive": {"proj_hidden": 32, "proj_dim": 16, "sigma": 10.0}}
    recipe = tiny_config(data={"medical": {"manifest": manifest}, "num_workers": 0}, objective=objective)
    out = tmp_path / "run"
    assert main(["--corpus", "medical", "--config", write_yaml(tmp_path / "r.yaml", recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error") and "m.csv: no row has a number in age" in err[-1]
    assert not out.exists()
