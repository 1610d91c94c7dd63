"""The representation probe: cross-validated linear fits of covariates on frozen features (python -m finetune probe)."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.model_selection import GroupKFold

import finetune.probe
from common.checkpoint import export_backbone
from common.errors import DataError
from common.models import create_backbone
from finetune.classical import L2
from finetune.cli import main
from finetune.config import RunConfig
from finetune.probe import cross_validated, min_class_subjects, outer_folds, run_probe, score, subject_counts

CNN = {"widen_factor": 0.25}


def probe_config(manifest, init="scratch") -> RunConfig:
    cfg = RunConfig(manifest=str(manifest), init=init)
    cfg.model.backbone, cfg.model.kwargs = "resnet18", dict(CNN)
    cfg.data.shape, cfg.data.spacing, cfg.data.intensity, cfg.data.num_workers = [16, 16, 16], [2.0] * 3, "none", 0
    cfg.train.device, cfg.train.precision = "cpu", "fp32"
    return cfg


@pytest.fixture(scope="module")
def age_manifests(make_cohort, tmp_path_factory):
    """A cohort whose images encode age (blob radius), and a copy whose age column is shuffled across subjects."""
    real = make_cohort(tmp_path_factory.mktemp("probe_age"), "brain_age", n_subjects=40)
    df = pd.read_csv(real)
    df["age"] = np.random.default_rng(1).permutation(df["age"].to_numpy())
    shuffled = real.with_name("shuffled.csv")
    df.to_csv(shuffled, index=False)
    return real, shuffled


def test_probe_recovers_an_encoded_covariate_and_not_a_shuffled_one(age_manifests, tmp_path):
    real, shuffled = age_manifests
    path = tmp_path / "enc.safetensors"  # an export: the probe takes any init spec fine-tuning takes
    # seeded: its weights would otherwise follow the tests run before it, and one random ResNet in many pools
    # features that hold no age at 16³ (r 0.04 in one random-order run)
    torch.manual_seed(0)
    export_backbone(
        create_backbone("resnet18", img_size=16, **CNN),
        path,
        {"input_size": [16, 16, 16], "spacing": [2.0] * 3, "intensity": "none"},
    )
    table = run_probe(probe_config(real, str(path)), ("age",), folds=3, out=tmp_path / "out")
    on = table.set_index("features")
    assert set(on.index) == {"init", "random", "classical"}
    age_sd = pd.read_csv(real)["age"].std()
    for features in ("init", "classical"):
        assert on.loc[features, "pearson_r"] > 0.8, table
        assert on.loc[features, "mae"] < 0.6 * age_sd, table
    written = pd.read_csv(tmp_path / "out" / "probe.csv")
    assert list(written["features"]) == ["init", "random", "classical"]
    control = run_probe(probe_config(shuffled), ("age",), folds=3).set_index("features")
    assert (control["pearson_r"].fillna(0) < 0.4).all(), control
    assert (control["mae"] > 0.6 * age_sd).all(), control


def test_probe_fits_its_features_with_the_linear_probes_grid_and_voxels_with_the_classical_one(
    age_manifests, monkeypatch
):
    real, _ = age_manifests
    calls = []
    fit = finetune.probe.cross_validated

    def spy(x, y, groups, continuous, folds, seed, l2):
        calls.append((x.shape[1], list(l2)))
        return fit(x, y, groups, continuous, folds, seed, l2)

    monkeypatch.setattr(finetune.probe, "cross_validated", spy)
    cfg = probe_config(real)
    cfg.train.probe_l2 = [3.0, 30.0]
    run_probe(cfg, ("age",), folds=3)
    init, random, voxels = calls
    assert init[1] == random[1] == [3.0, 30.0]
    assert voxels == (8**3, list(L2["regression"]))  # 16³ pooled by 2


def test_probe_of_categorical_covariates_separates_diagnosis_not_site(make_cohort, tmp_path):
    # diagnosis is drawn into the images, site is not: balanced accuracy near 1 vs near 0.5
    manifest = make_cohort(tmp_path / "ad", "ad", n_subjects=24)
    table = run_probe(probe_config(manifest), ("diagnosis", "site"), folds=4)
    classical = table[table.features == "classical"].set_index("covariate")
    assert classical.loc["diagnosis", "balanced_accuracy"] > 0.85, table
    assert classical.loc["diagnosis", "roc_auc"] > 0.9, table
    assert classical.loc["site", "balanced_accuracy"] < 0.75, table


def test_probe_cli_prints_the_table_and_names_a_bad_manifest(age_manifests, tmp_path, capsys):
    real, _ = age_manifests
    args = ["probe", "--init", "scratch", "--manifest", str(real), "--backbone", "resnet18", "--folds", "3"]
    sets = ["model.kwargs={widen_factor: 0.25}", "data.shape=[16,16,16]", "data.intensity=none"]
    assert main([*args, "--covariates", "age", *sets, "train.device=cpu", "train.precision=fp32"]) == 0
    printed = capsys.readouterr().out
    assert "age" in printed and "classical" in printed and "pearson_r" in printed
    missing = tmp_path / "nope.csv"
    assert main(["probe", "--init", "scratch", "--manifest", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(DataError, match="no column 'handedness'"):
        run_probe(probe_config(real), ("handedness",))


def test_probe_folds_keep_a_subjects_sessions_on_one_side(make_cohort, tmp_path, monkeypatch):
    """Two sessions per subject: no outer fold, and no inner fold choosing the strength, has one session of a
    subject in training and the other in testing (the probe would read the subject, not the covariate)."""
    manifest = make_cohort(tmp_path / "sessions", "brain_age", n_subjects=12, sessions=2)
    subject = pd.read_csv(manifest)["subject_id"].to_numpy()
    splits, outer_train = {"outer": [], "inner": []}, []

    class Recording(GroupKFold):  # records each split as rows of the manifest
        def split(self, X, y=None, groups=None):
            for train, test in super().split(X, y, groups):
                if len(X) == len(subject):
                    outer_train[:] = train
                    splits["outer"].append((train, test))
                else:  # an inner split of the current outer training rows
                    splits["inner"].append((np.asarray(outer_train)[train], np.asarray(outer_train)[test]))
                yield train, test

    monkeypatch.setattr(finetune.probe, "GroupKFold", Recording)
    run_probe(probe_config(manifest), ("age",), folds=3)
    assert len(splits["outer"]) == 3 * 3  # 3 folds for each feature set (init, random, classical)
    assert len(splits["inner"]) == 3 * len(splits["outer"])
    for train, test in splits["outer"] + splits["inner"]:
        assert not set(subject[train]) & set(subject[test])


@pytest.fixture(scope="module")
def small_cohort(make_cohort, tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("probe_bad"), "ad", n_subjects=12)


def probe_cli(manifest, *args) -> int:
    sets = ["model.kwargs={widen_factor: 0.25}", "data.shape=[16,16,16]", "data.intensity=none"]
    base = ["probe", "--init", "scratch", "--manifest", str(manifest), "--backbone", "resnet18"]
    return main([*base, *args, *sets, "train.device=cpu", "train.precision=fp32"])


ONE_MALE = ["M"] + ["F"] * 11
BAD = {  # edited columns, probe arguments, what the one error line says
    "constant age": ({"age": 70.0}, ["--covariates", "age"], ["'age'", "one value (70)"]),
    "inf age": (
        {"age": [np.inf, 60, 61, 62, -np.inf] + [70] * 7},
        ["--covariates", "age"],
        ["'age'", "(-inf, inf)", "lines 2, 6"],
    ),
    "one male": (
        {"sex": ONE_MALE},
        ["--covariates", "sex"],
        ["'sex'", "M: 1, F: 11", "fewer than 5 subjects", "--covariates"],
    ),
    "one male, 2 folds": (
        {"sex": ONE_MALE},
        ["--covariates", "sex", "--folds", "2"],
        ["'sex'", "M: 1", "fewer than 4"],
    ),
    "three males": ({"sex": ["M"] * 3 + ["F"] * 9}, ["--covariates", "sex"], ["M: 3, F: 9", "use --folds 3"]),
    "subject ids": (
        {"scan_id": [f"x{i}" for i in range(12)]},
        ["--covariates", "scan_id"],
        ["'scan_id'", "12 of its 12 classes have"],
    ),
    "folds 1": ({}, ["--folds", "1"], ["--folds 1", "at least 2"]),
    "folds 0": ({}, ["--folds", "0"], ["--folds 0", "at least 2"]),
    "folds -3": ({}, ["--folds", "-3"], ["--folds -3", "at least 2"]),
    "folds 13": ({}, ["--folds", "13"], ["--folds 13", "12 subjects"]),
}


@pytest.mark.parametrize("case", BAD)
def test_probe_refuses_a_covariate_or_folds_it_cannot_fit_with_one_error_line(case, small_cohort, tmp_path, capsys):
    columns, args, said = BAD[case]
    df = pd.read_csv(small_cohort)
    df["path"] = [str(small_cohort.parent / p) for p in df["path"]]
    for name, values in columns.items():
        df[name] = values
    manifest = tmp_path / "manifest.csv"
    df.to_csv(manifest, index=False)
    assert probe_cli(manifest, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for words in said:
        assert words in err[0], err[0]


def test_probe_skips_a_covariate_it_cannot_fit_with_the_reason_and_probes_the_others(
    small_cohort, tmp_path, capsys, caplog
):
    df = pd.read_csv(small_cohort)
    df["path"] = [str(small_cohort.parent / p) for p in df["path"]]
    df["sex"] = ONE_MALE  # one male: too few for 5 folds
    manifest = tmp_path / "manifest.csv"
    df.to_csv(manifest, index=False)
    assert probe_cli(manifest, "--covariates", "sex,age", "--out", str(tmp_path / "probe")) == 0
    out = capsys.readouterr()
    assert "sex: skipped — column 'sex': 1 of its 2 classes has fewer than 5 subjects" in out.out
    assert "age: init pearson_r=" in out.out
    assert "probe skips column 'sex'" in caplog.text  # and in the log
    table = pd.read_csv(tmp_path / "probe" / "probe.csv")
    assert set(table.loc[table["skipped"].isna(), "covariate"]) == {"age"}
    assert table.loc[table["covariate"] == "sex", "skipped"].str.contains("M: 1, F: 11").all()


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_probe_fits_a_class_with_the_fewest_subjects_its_folds_allow(folds):
    """The rarest class has ``min_class_subjects(folds)`` subjects, one of them with 4 sessions: every outer
    training set keeps 2 of them (an inner CV can still choose a penalty) and no subject is split across a fold."""
    rare = min_class_subjects(folds)
    groups = np.array([f"r{i}" for i in range(rare) for _ in range(4 if i == 0 else 1)] + [f"c{i}" for i in range(16)])
    y = np.array([1 if g.startswith("r") else 0 for g in groups])
    x = np.random.default_rng(0).normal(size=(len(y), 8)) + 3.0 * y[:, None]
    for train, test in outer_folds(y, groups, False, folds, seed=0):
        assert not set(groups[train]) & set(groups[test])
        assert subject_counts(y[train], groups[train], 2).min() >= 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fold with a missing class, no "least populated class" warning
        out = cross_validated(x, y, groups, False, folds, seed=0, l2=RunConfig().train.probe_l2)
    assert np.allclose(out.sum(axis=1), 1.0)
    assert score(y, out, False)["roc_auc"] > 0.9
