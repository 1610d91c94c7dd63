"""Paired gains: the bootstrap against hand-computed cases, the sign convention and the verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from finetune.gains import compute_gains, markdown, paired_gain, seed_metric, verdict


def _pairs(seeds, y, model, reference, subjects):
    return pd.DataFrame({"seed": seeds, "subject_id": subjects, "y_true": y, "model": model, "reference": reference})


def test_paired_bootstrap_matches_a_hand_computed_case():
    # Two subjects: the init's absolute error is 1 y smaller than scratch's on "a", 3 y smaller on "b", in both
    # seeds. A resample draws (a, a), (a, b) or (b, b): paired gains 1, 2, 3 with probabilities 1/4, 1/2, 1/4,
    # so the gain is 2 and the 95 % percentile CI is [1, 3]; MAE is better lower, so the gain is positive.
    y = np.array([50.0, 60.0, 50.0, 60.0])
    model = y + np.array([1.0, -1.0, 1.0, -1.0])  # |error| 1 on both
    reference = y + np.array([2.0, -4.0, 2.0, -4.0])  # |error| 2 on a, 4 on b
    pairs = _pairs([0, 0, 1, 1], y, model, reference, ["a", "b", "a", "b"])
    g = paired_gain(pairs, "mae", higher_is_better=False, n_boot=2000, seed=0)
    assert g["value"] == 1.0 and g["reference_value"] == 3.0
    assert g["gain"] == 2.0 and (g["ci_low"], g["ci_high"]) == (1.0, 3.0)
    assert g["n_seeds"] == 2 and g["n_subjects"] == 2


def test_same_model_gains_nothing_and_a_worse_one_hurts():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    score = y + rng.normal(0, 0.8, 60)
    subjects = [f"s{i}" for i in range(60)]
    same = paired_gain(_pairs([0] * 60, y, score, score, subjects), "roc_auc", True, n_boot=200)
    assert same["gain"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
    worse = paired_gain(_pairs([0] * 60, y, -score, score, subjects), "roc_auc", True, n_boot=200)
    assert worse["gain"] < 0 and verdict(worse["ci_low"], worse["ci_high"]) == "hurts"


def test_weighted_auc_equals_scikit_learn():
    rng = np.random.default_rng(1)
    y, score = rng.integers(0, 2, 30), np.round(rng.normal(size=30), 1)  # rounded: ties count one half
    weights = rng.integers(0, 4, (5, 30)).astype(float)
    expected = [roc_auc_score(y, score, sample_weight=w) for w in weights]
    assert seed_metric("roc_auc", y, score, weights) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("low", "high", "word"),
    [
        (0.01, 0.2, "helps"),
        (-0.3, -0.1, "hurts"),
        (-0.1, 0.1, "inconclusive"),
        (0.0, 0.2, "inconclusive"),  # a CI that touches 0 does not exclude it
        (-0.2, 0.0, "inconclusive"),
    ],
)
def test_verdict_from_the_ci(low, high, word):
    assert verdict(low, high) == word


def _write_cell(root, run_dir, subjects, y, prob, classical_prob):
    folder = root / run_dir
    folder.mkdir(parents=True)
    base = pd.DataFrame({"subject_id": subjects, "path": [f"{s}.nii.gz" for s in subjects], "fold": 0})
    test = base.assign(split="test", y_true=y)
    val = base.assign(split="val", y_true=y[::-1], prob_1=0.5)  # validation rows: never part of a gain
    pd.concat([val, test.assign(prob_1=prob)]).to_csv(folder / "predictions.csv", index=False)
    pd.concat([val, test.assign(prob_1=classical_prob)]).to_csv(folder / "classical_predictions.csv", index=False)


def test_gains_pair_the_seeds_both_inits_have_and_the_classical_baseline_every_seed(tmp_path):
    """scratch ran seeds 0-1, the init 0-2 (a grid extended later): against scratch the init is paired on seeds 0
    and 1 only, against the classical baseline of its own cells on all three; each seed's subjects in their own
    order. The gain against scratch is the init's AUC minus scratch's, seed by seed."""
    rng = np.random.default_rng(0)
    subjects = [f"s{i:02d}" for i in range(40)]
    y = np.array([i % 2 for i in range(40)])
    rows = []
    for init, seeds, skill in (("scratch", [0, 1], 0.0), ("pre", [0, 1, 2], 2.0)):
        for seed in seeds:
            order = rng.permutation(40)
            prob = 1 / (1 + np.exp(-(skill * (y[order] - 0.5) + rng.normal(0, 1, 40))))
            run_dir = f"cells/{init}/seed{seed}"
            _write_cell(tmp_path, run_dir, [subjects[i] for i in order], y[order], prob, rng.uniform(0, 1, 40))
            rows.append({"task": "ad", "backbone": "vit", "fraction": 1.0, "init": init, "seed": seed})
            rows[-1].update(run_dir=run_dir, primary="roc_auc", higher_is_better=True)
    gains = compute_gains(pd.DataFrame(rows), tmp_path, 20, n_boot=200).set_index(["init", "reference"])
    assert gains.loc[("pre", "scratch"), "n_seeds"] == 2 and gains.loc[("pre", "classical"), "n_seeds"] == 3
    assert gains.loc[("scratch", "classical"), "n_seeds"] == 2

    def auc(run_dir, file="predictions.csv"):
        t = pd.read_csv(tmp_path / run_dir / file).query("split == 'test'")
        return roc_auc_score(t["y_true"], t["prob_1"])

    expected = np.mean([auc(f"cells/pre/seed{s}") - auc(f"cells/scratch/seed{s}") for s in (0, 1)])
    assert gains.loc[("pre", "scratch"), "gain"] == pytest.approx(expected)
    expected = np.mean(
        [auc(f"cells/pre/seed{s}") - auc(f"cells/pre/seed{s}", "classical_predictions.csv") for s in range(3)]
    )
    assert gains.loc[("pre", "classical"), "gain"] == pytest.approx(expected)
    assert gains.loc[("pre", "scratch"), "verdict"] == "helps"


def test_the_bootstrap_matches_a_plain_one_over_subjects_with_several_sessions_and_seeds():
    """An independent oracle: resample subjects (not rows), score every row of a drawn subject in every seed by how
    often it was drawn, average the seeds' paired differences, take the percentiles. Three seeds whose subjects come
    in different orders, subjects with two sessions, one subject missing from a seed."""
    rng = np.random.default_rng(3)
    frames = []
    for seed in range(3):
        subjects = [f"s{i}" for i in range(12) for _ in range(1 + (i % 3 == 0))]  # s0, s3, s6, s9: two sessions
        if seed == 1:
            subjects = [s for s in subjects if s != "s5"]
        subjects = list(rng.permutation(subjects))
        y = rng.uniform(50, 80, len(subjects))
        frames.append(_pairs([seed] * len(y), y, y + rng.normal(0, 2, len(y)), y + rng.normal(0, 4, len(y)), subjects))
    pairs = pd.concat(frames, ignore_index=True)
    n_boot = 300
    g = paired_gain(pairs, "mae", higher_is_better=False, n_boot=n_boot, seed=7)

    names = sorted(set(pairs["subject_id"]))
    draws = np.random.default_rng(7).multinomial(len(names), np.full(len(names), 1 / len(names)), size=n_boot)
    boot = []
    for draw in draws:
        count = dict(zip(names, draw))
        per_seed = []
        for _, part in pairs.groupby("seed"):
            w = np.array([count[s] for s in part["subject_id"]], float)
            if w.sum() == 0:
                continue
            err_model = np.sum(w * np.abs(part["model"] - part["y_true"])) / w.sum()
            err_ref = np.sum(w * np.abs(part["reference"] - part["y_true"])) / w.sum()
            per_seed.append(err_ref - err_model)  # lower error = positive gain
        boot.append(np.mean(per_seed))
    point = np.mean(
        [
            np.mean(np.abs(p["reference"] - p["y_true"])) - np.mean(np.abs(p["model"] - p["y_true"]))
            for _, p in pairs.groupby("seed")
        ]
    )
    assert g["gain"] == pytest.approx(point)
    assert (g["ci_low"], g["ci_high"]) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))
    assert g["n_seeds"] == 3 and g["n_subjects"] == 12


# ----------------------------------------------------------------------- too_few: no verdict on too little
def _grid(root, scheme: str, seeds: dict[str, list[int]], n: int) -> pd.DataFrame:
    """A clearly better init than scratch on ``n`` subjects: ``kfold`` tests every subject once over 3 folds in each
    seed; ``holdout`` tests a different fifth of them in each seed. Returns the grid's ``results.csv`` frame."""
    rng = np.random.default_rng(1)
    subjects = np.array([f"s{i:03d}" for i in range(n)])
    y = np.arange(n) % 2
    rows = []
    for init, skill in (("scratch", 0.5), ("pre", 4.0)):
        for seed in seeds[init]:
            if scheme == "kfold":
                tested, fold = np.arange(n), np.arange(n) % 3
            else:
                tested = np.random.default_rng(seed).permutation(n)[: n // 5]
                fold = np.zeros(len(tested), int)
            prob = 1 / (1 + np.exp(-(skill * (y[tested] - 0.5) + rng.normal(0, 0.5, len(tested)))))
            folder = root / init / f"seed{seed}"
            folder.mkdir(parents=True)
            table = pd.DataFrame({"subject_id": subjects[tested], "path": [f"{s}.nii.gz" for s in subjects[tested]]})
            table = table.assign(fold=fold, split="test", y_true=y[tested], prob_1=prob)
            table.to_csv(folder / "predictions.csv", index=False)
            table.assign(prob_1=rng.uniform(0, 1, len(tested))).to_csv(
                folder / "classical_predictions.csv", index=False
            )
            rows.append({"task": "ad", "backbone": "vit", "fraction": 1.0, "init": init, "seed": seed})
            rows[-1].update(run_dir=f"{init}/seed{seed}", primary="roc_auc", higher_is_better=True)
    return pd.DataFrame(rows)


def test_kfold_counts_every_subject_tested_over_its_folds(tmp_path):
    """30 subjects in 3 folds of 10: 30 test subjects per seed, enough for a verdict at the default minimum."""
    gains = compute_gains(_grid(tmp_path, "kfold", {"scratch": [0], "pre": [0]}, 30), tmp_path, 20, n_boot=200)
    row = gains.set_index(["init", "reference"]).loc[("pre", "scratch")]
    assert row["n_test_subjects"] == 30 and row["verdict"] == "helps"
    fewer = compute_gains(_grid(tmp_path / "b", "kfold", {"scratch": [0], "pre": [0]}, 18), tmp_path / "b", 20)
    assert set(fewer["verdict"]) == {"too_few"}  # 18 subjects however clear the gain
    assert "`too_few`: no verdict — fewer than 20 test subjects" in markdown(fewer, 20)
    assert "too_few" not in markdown(gains, 20)


def test_a_holdout_counts_its_test_split_per_seed_not_the_subjects_pooled_over_seeds(tmp_path):
    """Three hold-out seeds of 100 subjects test 20 each (about 50 pooled): a verdict at a minimum of 20, none at 25."""
    results = _grid(tmp_path, "holdout", {"scratch": [0, 1, 2], "pre": [0, 1, 2]}, 100)
    gains = compute_gains(results, tmp_path, 20, n_boot=200).set_index(["init", "reference"])
    assert gains.loc[("pre", "scratch"), "n_test_subjects"] == 20 < gains.loc[("pre", "scratch"), "n_subjects"]
    assert gains.loc[("pre", "scratch"), "verdict"] == "helps"
    assert set(compute_gains(results, tmp_path, 25, n_boot=200)["verdict"]) == {"too_few"}


def test_one_seed_where_the_grid_has_several_gets_no_verdict(tmp_path):
    """scratch finished seed 0 only: the init's gain over it rests on one of the grid's two seeds (too_few); over
    the classical baseline, run in the init's own cells, it has both seeds and a verdict."""
    results = _grid(tmp_path, "kfold", {"scratch": [0], "pre": [0, 1]}, 30)
    gains = compute_gains(results, tmp_path, 20, n_boot=200).set_index(["init", "reference"])
    assert gains.loc[("pre", "scratch"), "verdict"] == "too_few"
    assert gains.loc[("pre", "classical"), "verdict"] == "helps"
    assert gains.loc[("scratch", "classical"), "verdict"] == "too_few"
