"""Writing cohorts: files, manifest, sites, resuming, determinism across workers, and bad-argument errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from common.data.manifest import MANIFEST_COLUMNS, read_manifest
from synth.cli import main
from synth.regions import LABELS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cohort_files_and_manifest(ad_cohort):
    df = pd.read_csv(ad_cohort / "manifest.csv", dtype={"subject_id": str})
    assert list(df.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert {"seed", "label_path", "effect_hippocampus_mm", "ventricle_ml", "hippocampus_ml"} <= set(df.columns)
    assert df["path"].tolist() == [f"images/sub-{i:05d}.nii.gz" for i in range(4)]
    assert set(df["dataset"]) == {"synth_ad"} and set(df["sex"]) <= {"F", "M"}
    assert sorted(df["diagnosis"]) == ["AD", "AD", "CN", "CN"]
    assert all(set(g["diagnosis"]) == {"AD", "CN"} for _, g in df.groupby("site"))  # each site has both classes
    assert df["age"].between(55, 90).all()
    read_manifest(ad_cohort / "manifest.csv", diagnoses=("CN", "AD"))  # the project's reader accepts it

    image = nib.load(ad_cohort / df["path"][0])
    labels = nib.load(ad_cohort / df["label_path"][0])
    assert image.shape == labels.shape == (40, 48, 40)
    assert np.allclose(image.header.get_zooms(), 4.0) and np.allclose(image.affine, labels.affine)
    assert image.get_data_dtype() == np.float32 and labels.get_data_dtype() == np.uint8
    data = image.get_fdata()
    assert 0.0 <= data.min() and data.max() <= 1.0
    assert set(np.unique(np.asarray(labels.dataobj)).tolist()) <= set(LABELS.values())


def test_rerun_skips_finished_subjects_and_extends(ad_cohort, tmp_path, capsys):
    ad_cohort = Path(shutil.copytree(ad_cohort, tmp_path / "cohort"))  # the session's cohort stays as made
    before = {p.name: p.stat().st_mtime_ns for p in (ad_cohort / "images").iterdir()}
    (ad_cohort / "labels" / "sub-00002.nii.gz").unlink()  # an unfinished subject is remade
    (ad_cohort / "images" / ".tmp-0123456789ab-sub-00003.nii.gz").write_bytes(b"half")  # a killed run's temp
    code = main(
        [
            "cohort",
            "--task",
            "ad",
            "--out",
            str(ad_cohort),
            "--n",
            "5",
            "--sites",
            "2",
            "--seed",
            "3",
            "--spacing",
            "4",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    after = {p.name: p.stat().st_mtime_ns for p in (ad_cohort / "images").iterdir()}
    assert after["sub-00000.nii.gz"] == before["sub-00000.nii.gz"]
    assert after["sub-00002.nii.gz"] != before["sub-00002.nii.gz"] and "sub-00004.nii.gz" in after
    assert len(pd.read_csv(ad_cohort / "manifest.csv")) == 5
    assert not [p for p in ad_cohort.rglob(".tmp-*")]  # no half-written files left behind


@pytest.mark.slow
def test_same_volumes_whatever_the_number_of_workers(tmp_path):
    args = ["generate", "--n", "3", "--seed", "9", "--spacing", "4", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "w1"), "--workers", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "w2"), "--workers", "2"]) == 0
    for i in range(3):
        a, b = (np.asarray(nib.load(tmp_path / w / "images" / f"sub-{i:06d}.nii.gz").dataobj) for w in ("w1", "w2"))
        assert np.array_equal(a, b)
    m1, m2 = (pd.read_csv(tmp_path / w / "manifest.csv") for w in ("w1", "w2"))
    pd.testing.assert_frame_equal(m1, m2)


BAD = [
    (["generate", "--n", "0"], "--n must be a positive"),
    (["generate", "--n", "2", "--spacing", "0"], "spacing must be > 0"),
    (["generate", "--n", "2", "--spacing", "-2"], "spacing must be > 0"),
    (["generate", "--n", "2", "--contrast", "pd"], "invalid choice: 'pd'"),
    (["cohort", "--task", "ms", "--n", "2"], "invalid choice: 'ms'"),
    (["generate", "--n", "2", "no_such.key=1"], "no_such"),
    (["generate", "--n", "2", "--workers", "0"], "--workers must be >= 1"),
]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_arguments_give_one_line_and_keep_outputs(ad_cohort, capsys, argv, message):
    before = sorted(p.relative_to(ad_cohort) for p in ad_cohort.rglob("*"))
    code = main([*argv, "--out", str(ad_cohort)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert sorted(p.relative_to(ad_cohort) for p in ad_cohort.rglob("*")) == before


def test_output_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert main(["generate", "--out", str(target), "--n", "1", "--spacing", "4"]) == 2
    assert "is a file" in capsys.readouterr().err and target.read_text() == "keep me"


def test_no_disk_space(ad_cohort, monkeypatch, capsys):
    import shutil

    import synth.cohort

    monkeypatch.setattr(synth.cohort.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    before = sorted(p.relative_to(ad_cohort) for p in ad_cohort.rglob("*"))
    code = main(
        [
            "cohort",
            "--task",
            "ad",
            "--out",
            str(ad_cohort),
            "--n",
            "8",
            "--sites",
            "2",
            "--seed",
            "3",
            "--spacing",
            "4",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "not enough disk space" in err and err.count("\n") == 1
    assert sorted(p.relative_to(ad_cohort) for p in ad_cohort.rglob("*")) == before


def test_resume_with_other_settings_is_refused(ad_cohort, capsys):
    code = main(
        [
            "cohort",
            "--task",
            "ad",
            "--out",
            str(ad_cohort),
            "--n",
            "2",
            "--sites",
            "2",
            "--seed",
            "4",
            "--spacing",
            "4",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "other settings" in err and "seed" in err


def test_invalid_yaml_names_its_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spacing: 4\natrophy: [1, 2\ncontrast: t1\n")
    assert main(["generate", "--out", str(tmp_path / "o"), "--n", "1", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not valid YAML at line 3" in err and err.count("\n") == 1


def test_overrides_may_follow_option_flags(tmp_path, capsys):
    code = main(["generate", "--out", str(tmp_path / "o"), "--n", "1", "spacing=4", "--seed", "1", "shape=[9]"])
    assert code == 2 and "shape" in capsys.readouterr().err  # reached the config: the override was parsed
