"""The oracle ceiling reads the true volumes (as fractions of ICV) and nothing else: a volume that separates the
classes gives an AUC near 1, shuffled labels chance, and an age-driven volume a small brain-age error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from experiment.oracle import oracle_ceiling, volume_fractions

N = 120


def cohort(seed: int = 0) -> pd.DataFrame:
    """A manifest's columns: ids, covariates, AD vs CN, an effect column that *is* the label, and volumes in mL whose
    ICV varies by ±30 %; only the hippocampus (as a fraction of ICV) carries the diagnosis."""
    rng = np.random.default_rng(seed)
    ad = np.arange(N) % 2 == 1
    icv = rng.uniform(1100, 1900, N)
    return pd.DataFrame(
        {
            "subject_id": [f"sub-{i:03d}" for i in range(N)],
            "age": rng.uniform(55, 85, N).round(1),
            "sex": rng.choice(["F", "M"], N),
            "diagnosis": np.where(ad, "AD", "CN"),
            "effect_ad": ad.astype(float),  # the generator's own record of the label: never a feature
            "brain_ml": 0.80 * icv,
            "csf_ml": 0.17 * icv,
            "ventricle_ml": 0.03 * icv,
            "hippocampus_ml": icv * (0.005 - 0.0008 * ad + rng.normal(0, 0.0002, N)),
            "gm_ml": icv * rng.normal(0.45, 0.01, N),
            "icv_ml": icv,
        }
    )


def test_volumes_are_fractions_of_the_icv_and_the_icv_is_no_region():
    frame = cohort()
    fractions = volume_fractions(frame)
    assert "icv_ml" not in fractions and "effect_ad" not in fractions
    icv = frame["brain_ml"] + frame["csf_ml"] + frame["ventricle_ml"]
    np.testing.assert_allclose(fractions["hippocampus_ml"], frame["hippocampus_ml"] / icv)
    np.testing.assert_allclose(fractions[["brain_ml", "csf_ml", "ventricle_ml"]].sum(axis=1), 1.0)


def test_a_separating_volume_reaches_an_auc_near_one_and_shuffled_labels_chance():
    frame = cohort()
    ceiling = oracle_ceiling(frame, "ad", n_boot=200)
    assert ceiling["metric"] == "roc_auc" and ceiling["n_subjects"] == N and ceiling["folds"] == 5
    assert ceiling["value"] > 0.95 and ceiling["ci_low"] > 0.9 and len(ceiling["per_seed"]) == 3
    assert {"age", "male", "hippocampus_ml"} <= set(ceiling["features"]) and "effect_ad" not in ceiling["features"]
    shuffled = frame.assign(diagnosis=frame["diagnosis"].sample(frac=1, random_state=1).to_numpy())
    chance = oracle_ceiling(shuffled, "ad", n_boot=200)
    assert abs(chance["value"] - 0.5) < 0.12 and chance["ci_low"] < 0.5 < chance["ci_high"]


def test_an_age_driven_volume_gives_a_small_brain_age_error():
    frame = cohort()
    frame["ventricle_ml"] = frame["icv_ml"] * (0.01 + 0.001 * (frame["age"] - 55))  # grows 3 % of ICV in 30 y
    ceiling = oracle_ceiling(frame.drop(columns="diagnosis"), "brain_age", n_boot=200)
    spread = np.mean(np.abs(frame["age"] - frame["age"].mean()))  # the mean predictor's error, ~7.5 y
    assert ceiling["metric"] == "mae" and ceiling["value"] < 0.3 * spread and "age" not in ceiling["features"]
    assert ceiling["ci_low"] <= ceiling["value"] <= ceiling["ci_high"]


def test_a_manifest_without_true_volumes_is_named():
    with pytest.raises(Exception, match="cohort.csv: no true volumes"):
        oracle_ceiling(cohort().drop(columns="csf_ml"), "ad", source="cohort.csv")
