"""synth/ldm/covariates.py: brain and ventricle volumes from label maps; missing covariates named."""

from __future__ import annotations

import numpy as np
import pytest
from ldm_toys import SCHEME

from common.data import read_manifest, write_nifti
from common.errors import DataError
from synth.ldm.covariates import covariate_table, label_volumes


def test_label_volumes_measure_millilitres(tmp_path):
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:2, :2, :2] = 4  # 8 ventricle voxels
    labels[5:, :, :] = 3  # 500 white-matter voxels
    labels[0, 9, 9] = 1  # CSF: not brain
    write_nifti(labels, tmp_path / "lab.nii.gz", spacing=(2, 2, 2), dtype=np.uint8)
    vent, brain = label_volumes(tmp_path / "lab.nii.gz", SCHEME)
    assert vent == pytest.approx(8 * 8 / 1000)
    assert brain == pytest.approx(500 * 8 / 1000)


def test_covariates_read_from_label_maps_and_missing_volumes_are_named(corpus, tmp_path):
    df = read_manifest(corpus)
    table = covariate_table(df, corpus, SCHEME)
    assert list(table["sex"]) == [0, 1, 0, 1, 0, 1]
    assert table["ventricle_volume"].is_monotonic_increasing  # the toy ventricle grows with age
    no_volumes = df.drop(columns=["label_path"])
    with pytest.raises(DataError, match="ventricle_volume"):
        covariate_table(no_volumes, tmp_path / "m.csv", SCHEME)
    given = no_volumes.assign(ventricle_ml=1.0, brain_ml=1000.0)  # the anatomy-model generator's columns
    assert covariate_table(given, tmp_path / "m.csv", SCHEME)["brain_volume"].eq(1000.0).all()
