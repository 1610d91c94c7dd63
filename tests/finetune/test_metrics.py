"""Metrics agree with scikit-learn, bias correction inverts a linear bias, CIs bracket the estimate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.errors import DataError
from finetune.metrics import (
    BiasCorrection,
    bootstrap_ci,
    classification_metrics,
    fast_binary_metrics,
    per_site,
    score_predictions,
    youden_threshold,
)
from finetune.tasks import get_task, label_rows


def test_fast_bootstrap_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    for i in range(6):
        y = rng.integers(0, 2, 40)
        p = np.clip(0.3 * y + 0.7 * rng.random(40), 0, 1)
        p = np.round(p, 1) if i % 2 else p  # tied scores: the AUC counts a tie as half
        exact = classification_metrics(y, np.stack([1 - p, p], axis=1))
        fast = fast_binary_metrics(y, p)
        assert fast == pytest.approx(exact)


def test_fast_metrics_equal_scikit_learn_at_a_per_row_threshold():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 40)
    p = np.clip(0.3 * y + 0.7 * rng.random(40), 0, 1)
    cut = np.where(np.arange(40) < 20, 0.3, 0.6)  # two folds, two cuts
    exact = classification_metrics(y, np.stack([1 - p, p], axis=1), cut)
    assert fast_binary_metrics(y, p, cut) == pytest.approx(exact)
    assert exact != pytest.approx(classification_metrics(y, np.stack([1 - p, p], axis=1)))


def test_youden_threshold_separates_shifted_probabilities():
    """A memorising network's test probabilities all sit above 0.5; the cut from validation still separates."""
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.55, 0.6, 0.62, 0.7, 0.8, 0.85, 0.9, 0.95])
    cut = youden_threshold(y, p)
    assert 0.7 < cut < 0.8
    table = pd.DataFrame({"subject_id": np.arange(8), "y_true": y, "prob_0": 1 - p, "prob_1": p})
    assert score_predictions(table, "classification", n_boot=0)["balanced_accuracy"] == 0.5
    tuned = score_predictions(table.assign(threshold=cut), "classification", n_boot=0)
    assert tuned["balanced_accuracy"] == 1.0 and tuned["roc_auc"] == 1.0
    assert youden_threshold(np.ones(4), p[:4]) == 0.5  # one class: nothing to fit


def test_scores_with_confidence_intervals_and_sites():
    rng = np.random.default_rng(1)
    y = np.tile([0, 1], 50)
    p = np.clip(0.4 * y + 0.6 * rng.random(100), 0, 1)
    pred = pd.DataFrame(
        {
            "subject_id": np.arange(100),
            "site": np.repeat(["a", "b"], 50),
            "y_true": y,
            "prob_0": 1 - p,
            "prob_1": p,
        }
    )
    scores = score_predictions(pred, "classification", n_boot=200)
    for name in ("accuracy", "balanced_accuracy", "roc_auc", "f1", "sensitivity", "specificity"):
        assert scores[f"{name}_lo"] <= scores[name] <= scores[f"{name}_hi"]
    sites = per_site(pred, "classification")
    assert list(sites["site"]) == ["a", "b"] and list(sites["n"]) == [50, 50]


def test_brain_age_bias_correction_inverts_regression_to_the_mean():
    age = np.linspace(20, 80, 50)
    pred = 0.5 * age + 25  # the classic bias: old predicted too young, young too old
    corr = BiasCorrection().fit(age, pred)
    assert corr.apply(pred) == pytest.approx(age)
    table = pd.DataFrame(
        {"subject_id": np.arange(50), "y_true": age, "y_pred": pred, "y_pred_corrected": corr.apply(pred)}
    )
    scores = score_predictions(table, "regression", n_boot=50)
    assert scores["mae_corrected"] == pytest.approx(0, abs=1e-9) and scores["mae"] > 5
    assert scores["pearson_r"] == pytest.approx(1.0)


def test_task_labels_and_their_errors():
    df = pd.DataFrame(
        {
            "path": ["a", "b", "c", "d"],
            "subject_id": list("abcd"),
            "diagnosis": ["CN", "AD", "MCI", "CN"],
            "age": [70, 71, None, 60],
            "sex": list("FMFM"),
        }
    )
    with pytest.raises(DataError, match="m.csv.*does not know: 'MCI' on 1 rows"):
        label_rows(get_task("ad"), df, "m.csv")  # MCI is not part of CN vs AD: dropped only when asked
    ad = label_rows(get_task("ad"), df, "m.csv", drop=["MCI"])
    assert list(ad.y) == [0, 1, 0] and ad.classes == ("CN", "AD") and ad.dropped == {"MCI": 1}
    sex = label_rows(get_task("classify:sex"), df, "m.csv")
    assert sex.classes == ("F", "M")
    with pytest.raises(DataError, match="m.csv.*'diagnosis' has 1 class"):
        label_rows(get_task("pd"), df.assign(diagnosis="HC"), "m.csv")
    with pytest.raises(DataError, match="needs column 'site'"):
        label_rows(get_task("classify:site"), df, "m.csv")
    with pytest.raises(DataError, match="'age' is empty on 1 rows \\(CSV lines 4\\); fill them.*missing=drop"):
        label_rows(get_task("brain_age"), df, "m.csv", missing="error")
    age = label_rows(get_task("brain_age"), df, "m.csv")  # missing=drop: the row without an age is left out
    assert list(age.y) == [70, 71, 60] and age.missing == 1 and list(age.df["subject_id"]) == list("abd")
    with pytest.raises(DataError, match="'age' must be numeric for task 'brain_age': 'old' on 1 rows \\(CSV lines 3"):
        label_rows(get_task("brain_age"), df.assign(age=[70, "old", None, 60]), "m.csv")


def test_a_site_whose_metrics_raise_keeps_its_row_with_the_reason():
    p = np.tile([0.2, 0.8], 6)
    pred = pd.DataFrame(
        {
            "subject_id": np.arange(12),
            "site": np.repeat(["a", "b", "c"], 4),
            "y_true": np.tile([0, 1], 6),
            "prob_0": 1 - p,
            "prob_1": p,
        }
    )
    pred.loc[pred["site"] == "b", ["prob_0", "prob_1"]] = np.nan  # e.g. a fold whose network diverged
    sites = per_site(pred, "classification").set_index("site")
    assert list(sites.index) == ["a", "b", "c"] and list(sites["n"]) == [4, 4, 4]
    assert sites.loc["a", "roc_auc"] == 1.0 and sites.loc["a", "error"] == ""
    assert np.isnan(sites.loc["b", "roc_auc"]) and "NaN" in sites.loc["b", "error"]


def test_bootstrap_resamples_subjects_and_covers_the_true_value():
    """Five identical rows per subject (sessions of a scan-rescan study): the 95 % CI of a mean must cover the
    true mean in about 95 % of cohorts. Resampling rows would treat 100 rows as independent and cover ~60 %."""
    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(20), 5)
    hits = []
    for rep in range(150):
        values = np.repeat(rng.normal(0.0, 1.0, 20), 5)  # true mean 0
        mean = lambda idx, v=values: {"mean": v[idx].mean()}
        ci = bootstrap_ci(mean, len(values), subjects, n_boot=200, seed=rep)
        hits.append(ci["mean"][0] <= 0.0 <= ci["mean"][1])
    assert 0.85 <= np.mean(hits) <= 1.0
    # score_predictions resamples by subject_id too: the same table read as 100 subjects gives a narrower CI
    table = pd.DataFrame({"subject_id": subjects, "y_true": 0.0, "y_pred": np.repeat(rng.normal(0, 1, 20), 5)})
    width = lambda t: np.subtract(*[score_predictions(t, "regression", n_boot=200)[f"mae_{b}"] for b in ("hi", "lo")])
    assert width(table) > 1.5 * width(table.assign(subject_id=np.arange(100)))
