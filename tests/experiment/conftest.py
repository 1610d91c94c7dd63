"""The experiment configs name their pre-training recipes relative to the repository, as a user runs them from
there; the experiment checks those recipes when it is built, so every test here runs from the repository root."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _from_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)
