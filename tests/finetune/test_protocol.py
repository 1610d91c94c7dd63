"""Leakage-safe splits: subjects never on two sides, identical images kept together, nested fractions."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from common.checkpoint import export_backbone
from common.config import load_config
from common.data import read_manifest
from common.errors import DataError
from common.models import create_backbone
from finetune.config import RunConfig
from finetune.protocol import (
    ProtocolConfig,
    check_pretrain_overlap,
    check_splits,
    make_folds,
    nested_subset,
    splits_frame,
    subject_table,
)
from finetune.run import prepare
from finetune.tasks import get_task, label_rows
from pretrain.config import PretrainConfig
from pretrain.provenance import export_metadata

TINY_VIT = {"patch_size": 8, "depth": 1}


@pytest.fixture(scope="module")
def sessions_cohort(tmp_path_factory, make_cohort):
    """30 subjects × 2 sessions, 3 sites, one subject's image duplicated under a new subject ID."""
    folder = tmp_path_factory.mktemp("sessions")
    manifest = make_cohort(folder, "ad", n_subjects=30, sites=3, sessions=2)
    df = pd.read_csv(manifest)
    shutil.copy(folder / "images/sub-000_ses-0.nii.gz", folder / "images/dup.nii.gz")
    dup = df.iloc[[0]].assign(path="images/dup.nii.gz", subject_id="sub-dup", session_id="ses-0")
    pd.concat([df, dup]).to_csv(manifest, index=False)
    return manifest


def _subjects(manifest):
    df = read_manifest(manifest)
    labelled = label_rows(get_task("ad"), df, str(manifest))
    return labelled, subject_table(labelled.df, labelled.y, classification=True)


def test_kfold_is_subject_level_stratified_and_keeps_identical_images_together(sessions_cohort):
    labelled, subjects = _subjects(sessions_cohort)
    folds = make_folds(subjects, ProtocolConfig(folds=3, repeats=2), seed=0)
    assert len(folds) == 6
    for repeat in (folds[:3], folds[3:]):
        tested = np.concatenate([f.test for f in repeat])
        assert sorted(tested) == sorted(subjects["subject_id"])  # each subject tested once per repeat
    strata = subjects.set_index("subject_id")["strata"]
    for f in folds:
        assert not set(f.train) & set(f.test) and not set(f.val) & set(f.test) and not set(f.train) & set(f.val)
        assert set(strata[f.test]) == {0, 1}  # both classes in every test fold
        side = {s: name for name, ids in (("train", f.train), ("val", f.val), ("test", f.test)) for s in ids}
        assert side["sub-dup"] == side["sub-000"]  # byte-identical images are one group
    splits = splits_frame(folds)
    check_splits(splits, labelled.df, "splits")  # no error
    assert list(splits.columns) == ["subject_id", "fold", "split"]


def test_a_given_split_that_leaks_is_an_error(sessions_cohort):
    labelled, subjects = _subjects(sessions_cohort)
    ids = sorted(subjects["subject_id"])
    leak = pd.DataFrame({"subject_id": ids, "fold": 0, "split": ["train"] * (len(ids) - 1) + ["test"]})
    leak = pd.concat([leak, pd.DataFrame({"subject_id": [ids[0]], "fold": [0], "split": ["test"]})])
    with pytest.raises(DataError, match="sub-000 are in more than one"):
        check_splits(leak, labelled.df, "given.csv")
    same_image = pd.DataFrame({"subject_id": ids, "fold": 0, "split": "train"})
    same_image.loc[same_image.subject_id == "sub-dup", "split"] = "test"
    with pytest.raises(DataError, match="same image is in"):
        check_splits(same_image, labelled.df, "given.csv")


def test_training_fractions_are_nested(sessions_cohort):
    _, subjects = _subjects(sessions_cohort)
    fold = make_folds(subjects, ProtocolConfig(folds=3), seed=1)[0]
    subsets = [set(nested_subset(subjects, fold.train, f, seed=5)) for f in (0.1, 0.25, 0.5, 1.0)]
    assert all(small < large for small, large in zip(subsets, subsets[1:]))
    strata = subjects.set_index("subject_id")["strata"]
    assert set(strata[list(subsets[0])]) == {0, 1}  # every class even at 10 %


def test_site_schemes(sessions_cohort):
    _, subjects = _subjects(sessions_cohort)
    loso = make_folds(subjects, ProtocolConfig(scheme="loso"), seed=0)
    site = subjects.set_index("subject_id")["site"]
    assert sorted(f.name for f in loso) == ["site site0", "site site1", "site site2"]
    for f in loso:
        assert site[f.test].nunique() == 1 and site[f.test].iloc[0] not in set(site[f.train])
    ood = make_folds(subjects, ProtocolConfig(scheme="ood", ood_sites=["site2"]), seed=0)
    assert set(site[ood[0].test]) == {"site2"} and "site2" not in set(site[ood[0].train])


def test_test_image_in_a_pretraining_manifest_is_an_error(sessions_cohort, tmp_path, caplog):
    df = read_manifest(sessions_cohort)
    pretrain = tmp_path / "pretrain.csv"
    shutil.copy(df["path"][3], tmp_path / "copy.nii.gz")  # the same bytes under another name
    pd.DataFrame({"path": ["copy.nii.gz"]}).to_csv(pretrain, index=False)
    cfg = ProtocolConfig(pretrain_manifests=[str(pretrain)])
    with pytest.raises(DataError, match="byte-identical.*protocol.allow_pretrain_overlap=true"):
        check_pretrain_overlap([df["path"][3]], cfg, "scratch")
    check_pretrain_overlap([df["path"][4]], cfg, "scratch")  # a different image passes
    cfg.allow_pretrain_overlap = True  # one override for every way the encoder can have seen an image
    check_pretrain_overlap([df["path"][3]], cfg, "scratch")
    assert "byte-identical" in caplog.text and "allow_pretrain_overlap=true" in caplog.text


# ----------------------------------------------------------------------- leakage against the export's record
def _pretrained_on(images, tmp_path) -> str:
    """An export whose pre-training (``pretrain.provenance``) read byte copies of ``images`` from a medical
    manifest, as a corpus holds them: new names, same bytes."""
    folder = tmp_path / "corpus"
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        shutil.copy(image, folder / f"corpus-{i}.nii.gz")
    pd.DataFrame({"path": [f"corpus-{i}.nii.gz" for i in range(len(images))]}).to_csv(folder / "m.csv", index=False)
    corpus = ["corpus=medical", f"data.medical.manifest={folder / 'm.csv'}", "data.shape=[16,16,16]"]
    pre = load_config(PretrainConfig, overrides=corpus)
    model = create_backbone("vit_tiny_p16", img_size=16, in_chans=1, **TINY_VIT)
    return str(export_backbone(model, tmp_path / "encoder.safetensors", export_metadata(pre)))


def _cell(manifest, init: str) -> RunConfig:
    cfg = RunConfig(task="ad", manifest=str(manifest), init=init)
    cfg.model.backbone, cfg.model.kwargs = "vit_tiny_p16", dict(TINY_VIT)
    cfg.data.shape, cfg.data.spacing, cfg.data.num_workers = [16, 16, 16], [2.0] * 3, 0
    cfg.protocol.folds = 3
    return cfg


def test_fine_tuning_refuses_a_test_image_the_export_was_pretrained_on_unless_overridden(make_cohort, tmp_path, caplog):
    """Nothing set but ``--init``: the export's own record of its pre-training images is checked by default; the
    error names the test image and the override, and the override runs with a warning."""
    manifest = make_cohort(tmp_path / "cohort", "ad", n_subjects=12)
    other = make_cohort(tmp_path / "other", "ad", n_subjects=3, seed=9)  # images the cohort does not hold
    df = read_manifest(manifest)
    image = df["path"][5]  # k-fold: every subject is tested in one fold
    clean = [str(p) for p in read_manifest(other)["path"]]
    prepare(_cell(manifest, _pretrained_on(clean, tmp_path / "clean")))  # pre-trained on other images: passes
    cfg = _cell(manifest, _pretrained_on([*clean, image], tmp_path / "leak"))
    with pytest.raises(
        DataError,
        match=f"test image {image} was in the encoder's pre-training data.*protocol.allow_pretrain_overlap=true",
    ) as refused:
        prepare(cfg)
    assert str(refused.value).startswith(str(tmp_path / "leak" / "encoder.safetensors"))
    cfg.protocol.allow_pretrain_overlap = True
    prepare(cfg)
    assert f"test image {image} was in the encoder's pre-training data" in caplog.text
