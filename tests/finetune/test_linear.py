"""The shared L2 linear models: fitted in the span of the training rows, they predict what the fit on all
features predicts."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

from common.errors import ConfigError
from finetune.linear import fit_select, row_space


def _wide(seed: int = 0, n: int = 60, p: int = 500) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)) * rng.uniform(0.5, 3, p)  # columns of unequal scale: standardising matters
    x[:, 7] = 4.0  # a constant column: zero after standardising
    y = x[:, :10] @ rng.normal(size=10) + rng.normal(0, 0.5, n)
    return x, y


def _direct(x, y, kind, train, rows, l2):
    """scikit-learn on all features at L2 penalty ``l2``: ridge alpha = l2, logistic regression C = 1 / l2."""
    xs = StandardScaler().fit(x[train]).transform(x)
    if kind == "regression":
        return Ridge(alpha=l2).fit(xs[train], y[train]).predict(xs[rows])
    model = LogisticRegression(C=1 / l2, class_weight="balanced", max_iter=5000, tol=1e-8)
    return model.fit(xs[train], y[train]).predict_proba(xs[rows])


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_fitting_in_the_row_space_predicts_what_the_full_fit_predicts(kind):
    x, y = _wide()
    if kind == "classification":
        y = (y > np.median(y)).astype(int)
    train, val, test = np.arange(36), np.arange(36, 48), np.arange(48, 60)
    l2 = 10.0 if kind == "regression" else 100.0
    _, out, chosen = fit_select(x, y, kind, train, val, test, l2=[l2])
    assert np.allclose(out, _direct(x, y, kind, train, test, l2), atol=2e-3)
    assert chosen["n_features"] == 500


@pytest.mark.parametrize("kind, first", [("regression", 0.1), ("classification", 1000.0)])
def test_ties_keep_the_penalty_scikit_learns_parameter_tries_first(kind, first):
    """Featureless rows: every penalty predicts the same, so all tie on validation. The first tried is kept,
    whatever the grid's order: ridge's smallest alpha, logistic regression's smallest C (the largest λ), as the
    separate grids of alpha and of C, each ascending, did before they became one grid of λ."""
    y = np.r_[np.zeros(20), np.ones(20)]
    y = y.astype(int) if kind == "classification" else y + np.random.default_rng(0).normal(0, 0.1, 40)
    rows = np.random.default_rng(1).permutation(40)
    _, _, chosen = fit_select(np.zeros((40, 5)), y, kind, rows[:24], rows[24:32], rows[32:], l2=[10.0, 1e3, 0.1, 1.0])
    assert chosen["l2"] == first


def test_no_validation_rows_is_an_error_saying_what_to_set():
    x, y = _wide(n=40, p=20)
    with pytest.raises(ConfigError, match="no validation subjects .* protocol.val_fraction > 0"):
        fit_select(x, y, "regression", np.arange(30), np.arange(0), np.arange(30, 40), l2=[1.0])


def test_row_space_keeps_narrow_inputs_and_shrinks_wide_ones():
    x, _ = _wide(n=20, p=50)
    train = np.arange(15)
    assert row_space(x[:, :10], train) is not None and row_space(x[:, :10], train).shape == (20, 10)
    z = row_space(x, train)
    assert z.shape == (20, 15)
    # distances between training rows are kept (an orthonormal change of basis)
    d = lambda a: np.linalg.norm(a[train, None] - a[None, train], axis=-1)
    assert np.allclose(d(z), d(x))


def test_the_penalty_is_chosen_on_validation():
    """The validation rows follow the training rows' relation; the test rows' targets are the training mean, which
    only the strongest penalty predicts. The penalty kept must be the validation's best, not the test's."""
    x, y = _wide(seed=1, p=40)
    train, val, test = np.arange(36), np.arange(36, 48), np.arange(48, 60)
    y[test] = y[train].mean()
    penalties = [1e-3, 1.0, 1e7]
    mae = lambda rows, s: np.mean(np.abs(_direct(x, y, "regression", train, rows, s) - y[rows]))
    # no shrinkage overfits 36 rows of 40 features; 1e7 predicts the training mean, which the test rows hold
    assert min(penalties, key=lambda s: mae(val, s)) == 1.0 and min(penalties, key=lambda s: mae(test, s)) == 1e7
    _, test_out, chosen = fit_select(x, y, "regression", train, val, test, l2=penalties)
    assert chosen["l2"] == 1.0
    assert chosen["val_score"] == pytest.approx(-mae(val, 1.0), rel=1e-4)
    np.testing.assert_allclose(test_out, _direct(x, y, "regression", train, test, 1.0), atol=1e-4)
