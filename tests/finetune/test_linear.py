"""The shared L2 linear models: fitted in the span of the training rows, they predict what the fit on all
features predicts."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

from finetune.linear import fit_select, row_space


def _wide(seed: int = 0, n: int = 60, p: int = 500) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)) * rng.uniform(0.5, 3, p)  # columns of unequal scale: standardising matters
    x[:, 7] = 4.0  # a constant column: zero after standardising
    y = x[:, :10] @ rng.normal(size=10) + rng.normal(0, 0.5, n)
    return x, y


def _direct(x, y, kind, train, rows, strength):
    xs = StandardScaler().fit(x[train]).transform(x)
    if kind == "regression":
        return Ridge(alpha=strength).fit(xs[train], y[train]).predict(xs[rows])
    model = LogisticRegression(C=strength, class_weight="balanced", max_iter=5000, tol=1e-8)
    return model.fit(xs[train], y[train]).predict_proba(xs[rows])


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_fitting_in_the_row_space_predicts_what_the_full_fit_predicts(kind):
    x, y = _wide()
    if kind == "classification":
        y = (y > np.median(y)).astype(int)
    train, val, test = np.arange(36), np.arange(36, 48), np.arange(48, 60)
    strength = 10.0 if kind == "regression" else 0.01
    _, out, chosen = fit_select(x, y, kind, train, val, test, strengths=[strength])
    assert np.allclose(out, _direct(x, y, kind, train, test, strength), atol=2e-3)
    assert chosen["n_features"] == 500


def test_row_space_keeps_narrow_inputs_and_shrinks_wide_ones():
    x, _ = _wide(n=20, p=50)
    train = np.arange(15)
    assert row_space(x[:, :10], train) is not None and row_space(x[:, :10], train).shape == (20, 10)
    z = row_space(x, train)
    assert z.shape == (20, 15)
    # distances between training rows are kept (an orthonormal change of basis)
    d = lambda a: np.linalg.norm(a[train, None] - a[None, train], axis=-1)
    assert np.allclose(d(z), d(x))


def test_strength_is_chosen_on_validation():
    """The validation rows follow the training rows' relation; the test rows' targets are the training mean, which
    only the strongest penalty predicts. The strength kept must be the validation's best, not the test's."""
    x, y = _wide(seed=1, p=40)
    train, val, test = np.arange(36), np.arange(36, 48), np.arange(48, 60)
    y[test] = y[train].mean()
    strengths = [1e-3, 1.0, 1e7]
    mae = lambda rows, s: np.mean(np.abs(_direct(x, y, "regression", train, rows, s) - y[rows]))
    # no shrinkage overfits 36 rows of 40 features; 1e7 predicts the training mean, which the test rows hold
    assert min(strengths, key=lambda s: mae(val, s)) == 1.0 and min(strengths, key=lambda s: mae(test, s)) == 1e7
    _, test_out, chosen = fit_select(x, y, "regression", train, val, test, strengths=strengths)
    assert chosen["alpha"] == 1.0
    assert chosen["val_score"] == pytest.approx(-mae(val, 1.0), rel=1e-4)
    np.testing.assert_allclose(test_out, _direct(x, y, "regression", train, test, 1.0), atol=1e-4)
