"""BIDS in: ``python -m finetune manifest`` on a BIDS tree laid out as studies share it, ``.tsv`` manifests, two
runs of a session, and rows with an empty label or covariate left out and counted."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from common.data import read_manifest
from common.errors import DataError
from finetune.cli import main
from finetune.probe import covariate_targets

SIZE = 8  # voxels per axis
ISOTROPIC = np.diag([2.0, 2.0, 2.0, 1.0])
LPS = np.diag([-2.0, -2.0, 2.0, 1.0])
ANISOTROPIC = np.diag([1.0, 1.0, 3.0, 1.0])
DERIVED = "derivatives/fmriprep/sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"
ECHO = "sub-06/anat/sub-06_echo-1_T1w.nii.gz"  # an entity a manifest row does not keep: left out


def _volume(path: Path, age: float, affine=ISOTROPIC) -> None:
    """A blob whose radius grows with age, in noise."""
    rng = np.random.default_rng(int(age * 10))
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"))
    radius = 1.5 + 2.0 * (age - 60) / 30
    blob = np.linalg.norm(grid - SIZE / 2, axis=0) < radius
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image((1 + 2 * blob + rng.normal(0, 0.2, blob.shape)).astype(np.float32), affine), path)


def _tsv(path: Path, rows: list[list]) -> None:
    path.write_text("\n".join("\t".join(map(str, r)) for r in rows) + "\n")


@pytest.fixture(scope="module")
def bids(tmp_path_factory) -> Path:
    """16 listed subjects (Control/Dementia, n/a ages, male/F sexes), sub-01 with two sessions whose ages are in its
    sessions.tsv, sub-02 with two runs of one session, an LPS and an anisotropic file, a derivatives/ image, an
    echo image, sub-17 not in participants.tsv; scanner sidecars: Siemens for all, GE for sub-03."""
    root = tmp_path_factory.mktemp("bids")
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tinybids", "BIDSVersion": "1.8.0"}))
    rows = [["participant_id", "age", "sex", "group", "handedness"]]
    for i in range(1, 17):
        age = "n/a" if i in (1, 5) else 60 + 2 * i
        rows.append([f"sub-{i:02d}", age, "male" if i % 2 else "F", "Dementia" if i % 2 else "Control", "R"])
    _tsv(root / "participants.tsv", rows)
    for i in range(3, 18):
        affine = LPS if i == 3 else ANISOTROPIC if i == 4 else ISOTROPIC
        _volume(root / f"sub-{i:02d}/anat/sub-{i:02d}_T1w.nii.gz", 60 + 2 * i, affine)
    for ses, age in (("1", 70), ("2", 72.5)):
        _volume(root / f"sub-01/ses-{ses}/anat/sub-01_ses-{ses}_T1w.nii.gz", age)
    _tsv(root / "sub-01/sub-01_sessions.tsv", [["session_id", "age"], ["ses-1", 70], ["ses-2", 72.5]])
    for run in ("1", "2"):
        _volume(root / f"sub-02/ses-1/anat/sub-02_ses-1_run-{run}_T1w.nii", 64)
    _volume(root / DERIVED, 70)
    _volume(root / ECHO, 72)
    scanner = {"Manufacturer": "Siemens", "ManufacturersModelName": "Prisma", "MagneticFieldStrength": 3}
    (root / "T1w.json").write_text(json.dumps(scanner))
    ge = {"Manufacturer": "GE", "ManufacturersModelName": "Discovery MR750"}
    (root / "sub-03/anat/sub-03_T1w.json").write_text(json.dumps(ge))
    return root


def manifest_cli(bids: Path, out: Path, *args: str) -> int:
    return main(["manifest", "--bids", str(bids), "--out", str(out), *args])


@pytest.fixture(scope="module")
def manifest(bids, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("manifests") / "manifest.csv"
    mapped = ["--label-map", "Control=CN,Dementia=AD", "--label-column", "group", "--site-from-sidecar"]
    assert manifest_cli(bids, out, *mapped) == 0
    return out


def test_manifest_has_a_row_per_t1w_image_with_participant_and_session_columns(manifest, bids):
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False).set_index("path")
    assert list(df.reset_index().columns[:9]) == [
        *("path", "subject_id", "session_id", "site", "dataset", "age", "sex", "diagnosis", "run"),
    ]
    assert "handedness" in df.columns and "group" not in df.columns
    assert len(df) == 15 + 2 + 2  # sub-03..17 once, sub-01 twice (sessions), sub-02 twice (runs)
    paths = set(df.index)
    assert not any("derivatives" in p or "echo" in p for p in paths)  # left out unless asked / not a row's entity
    assert all((manifest.parent / p).is_file() and not Path(p).is_absolute() for p in paths)
    sub01 = df[df["subject_id"] == "sub-01"].sort_values("session_id")
    assert list(sub01["session_id"]) == ["ses-1", "ses-2"] and list(sub01["age"]) == ["70", "72.5"]
    sub02 = df[df["subject_id"] == "sub-02"].sort_values("run")
    assert list(sub02["run"]) == ["1", "2"] and set(sub02["session_id"]) == {"ses-1"}
    sub05 = df[df["subject_id"] == "sub-05"].iloc[0]
    assert sub05["age"] == "" and sub05["diagnosis"] == "AD" and sub05["sex"] == "M"  # n/a -> empty cell
    sub04 = df[df["subject_id"] == "sub-04"].iloc[0]
    assert (sub04["diagnosis"], sub04["sex"], sub04["age"], sub04["dataset"]) == ("CN", "F", "68", "tinybids")
    sub17 = df[df["subject_id"] == "sub-17"].iloc[0]  # images but no participants.tsv row: kept, columns empty
    assert sub17["age"] == sub17["diagnosis"] == ""
    assert df.loc[df["subject_id"] == "sub-03", "site"].item() == "GE Discovery MR750 3T"  # inherits the field
    assert set(df.loc[df["subject_id"] != "sub-03", "site"]) == {"Siemens Prisma 3T"}
    read = read_manifest(manifest, diagnoses=None)  # two runs of a session are two images, not duplicate rows
    assert len(read) == len(df) and read["age"].isna().sum() == 2


def test_derivatives_are_read_only_when_asked(bids, tmp_path):
    assert manifest_cli(bids, tmp_path / "derived.csv", "--derivatives", "fmriprep") == 0
    df = pd.read_csv(tmp_path / "derived.csv")
    assert len(df) == 1 and (tmp_path / df["path"].item()).resolve() == (bids / DERIVED).resolve()
    assert df["desc"].item() == "preproc" and "age" not in df  # sub-01's participant age is n/a: no column


def test_a_tsv_manifest_is_read_by_its_extension(manifest, tmp_path, bids):
    tsv = manifest.with_suffix(".tsv")
    assert manifest_cli(bids, tsv, "--label-map", "Control=CN,Dementia=AD", "--label-column", "group") == 0
    assert "\t" in tsv.read_text().splitlines()[0]
    csv, read = read_manifest(manifest), read_manifest(tsv)
    pd.testing.assert_frame_equal(csv.drop(columns="site"), read)
    with pytest.raises(DataError, match="participants.tsv: missing column.*python -m finetune manifest --bids"):
        read_manifest(bids / "participants.tsv")  # read as a table now, and named for what it is


def test_two_images_of_a_session_need_a_column_telling_them_apart(manifest, tmp_path):
    df = pd.read_csv(manifest, dtype=str)
    df["path"] = [str(manifest.parent / p) for p in df["path"]]
    no_run = tmp_path / "no_run.csv"
    df.drop(columns="run").to_csv(no_run, index=False)
    with pytest.raises(DataError, match="duplicate rows: subject sub-02 session ses-1 on lines .*add a column"):
        read_manifest(no_run)
    same_run = tmp_path / "same_run.csv"
    df.assign(run="1").to_csv(same_run, index=False)
    with pytest.raises(DataError, match="subject sub-02 session ses-1 run 1 on lines"):
        read_manifest(same_run)


BAD = {  # what is broken in the tree or the flags, what the one error line names
    "no participants.tsv": (lambda root: (root / "participants.tsv").unlink(), [], "participants.tsv: not found"),
    "label not in the map": (
        lambda root: None,
        ["--label-map", "Control=CN", "--label-column", "group"],
        "participants.tsv: label(s) 'Dementia' of column 'group'",
    ),
    "no such label column": (lambda root: None, ["--label-column", "dx"], "participants.tsv: has no label column 'dx'"),
    "label map syntax": (lambda root: None, ["--label-map", "Control"], "--label-map: 'Control' is not FROM=TO"),
    "bad sex": (
        lambda root: (root / "participants.tsv").write_text("participant_id\tsex\nsub-03\tX\n"),
        [],
        "participants.tsv: sex 'X' on line 2 is not a BIDS value",
    ),
    "no derivatives": (lambda root: None, ["--derivatives", "freesurfer"], "no such derivatives folder"),
    "name and folder disagree": (
        lambda root: _volume(root / "sub-03/anat/sub-99_T1w.nii.gz", 70),
        [],
        "sub-99_T1w.nii.gz: its name's sub disagrees with its folder",
    ),
    "one image twice": (
        lambda root: _volume(root / "sub-04/anat/sub-04_T1w.nii", 70),
        [],
        "sub-04_T1w.nii: has the same entities as",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_bids_input_ends_with_one_error_line_naming_the_file(case, bids, tmp_path, capsys):
    root = tmp_path / "copy"
    _copy(bids, root)
    breaks, args, said = BAD[case]
    breaks(root)
    assert manifest_cli(root, tmp_path / "m.csv", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()  # log lines (warnings) may come first where logging is set up
    assert err[-1].startswith("error: ") and said in err[-1], err
    assert not any(line.startswith(("error", "Traceback")) for line in err[:-1]), err
    assert not (tmp_path / "m.csv").exists()


def _copy(src: Path, dst: Path) -> None:
    for path in src.rglob("*"):
        if path.is_file():
            (dst / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / path.relative_to(src)).write_bytes(path.read_bytes())


def run_cli(manifest: Path, out: Path, *overrides: str) -> int:
    base = ["run", "--task", "brain_age", "--manifest", str(manifest), "--init", "scratch", "--backbone", "resnet18"]
    settings = ["data.shape=[16,16,16]", "data.num_workers=0", "protocol.folds=2", "bootstrap=20"]
    device = ["classical_pool=0", "train.device=cpu", "train.precision=fp32"]
    return main([*base, "--mode", "linear", "--out", str(out), *settings, *device, *overrides])


def test_run_leaves_out_rows_without_an_age_counts_them_and_keeps_runs_together(manifest, tmp_path, capsys):
    assert run_cli(manifest, tmp_path / "strict", "missing=error") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'age' is empty on 2 rows" in err[0] and "missing=drop" in err[0], err
    assert run_cli(manifest, tmp_path / "run") == 0
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["dropped_missing"] == 2  # sub-05 (n/a) and sub-17 (not in participants.tsv)
    predictions = pd.read_csv(tmp_path / "run/predictions.csv")
    assert not predictions["subject_id"].isin(["sub-05", "sub-17"]).any()
    runs = predictions[predictions["subject_id"] == "sub-02"]
    assert runs["path"].nunique() == 2 and len(runs) == 2 * runs["fold"].nunique()  # both runs in each fold ...
    assert (runs.groupby("fold")["split"].nunique() == 1).all()


def test_probe_fits_each_covariate_on_its_rows_with_a_value():
    df = pd.DataFrame(
        {
            "subject_id": [f"s{i}" for i in range(10)],
            "age": [60.0, np.nan, 62, 63, np.nan, 65, 66, 67, 68, 69],
            "sex": ["F", "M"] * 5,
        }
    )
    targets, skipped = covariate_targets(df, ("age", "sex"), "m.csv", folds=2)
    kept, y = targets["age"]
    assert list(kept) == [0, 2, 3, 5, 6, 7, 8, 9] and list(y) == [60, 62, 63, 65, 66, 67, 68, 69]
    assert len(targets["sex"][0]) == 10 and not skipped
    with pytest.raises(DataError, match="'age' has empty cells \\(CSV lines 3, 6 \\(2 rows\\)\\).*missing=drop"):
        covariate_targets(df, ("age",), "m.csv", folds=2, missing="error")
