"""Paired gains: the bootstrap against hand-computed cases, the sign convention and the verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from finetune.gains import paired_gain, seed_metric, verdict


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
    ("low", "high", "word"), [(0.01, 0.2, "helps"), (-0.3, -0.1, "hurts"), (-0.1, 0.1, "inconclusive")]
)
def test_verdict_from_the_ci(low, high, word):
    assert verdict(low, high) == word
