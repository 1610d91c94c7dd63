"""synth/ldm/training_data.py: unreadable training volumes are skipped, then stop the run."""

from __future__ import annotations

import numpy as np
import pytest

from common.data import read_manifest
from common.errors import DataError
from synth.ldm.config import LDMDataConfig
from synth.ldm.training_data import BadSampleGuard, ConditionedVolumes, collate_skipping_bad


def test_bad_files_are_skipped_then_stop_the_run(corpus, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    df = read_manifest(corpus)
    ds = ConditionedVolumes(
        [df["path"][0], str(broken)], np.zeros((2, 4)), LDMDataConfig(shape=[16, 16, 16]).preprocess()
    )
    batch = collate_skipping_bad([ds[0], ds[1]])
    assert batch["image"].shape == (1, 1, 16, 16, 16) and len(batch["bad"]) == 1
    BadSampleGuard(limit=0.5, dataset_size=2, manifest="m.csv").update(batch)  # 1 of 2 is allowed
    with pytest.raises(DataError, match="max_bad_fraction"):
        BadSampleGuard(limit=0.1, dataset_size=2, manifest="m.csv").update(batch)
