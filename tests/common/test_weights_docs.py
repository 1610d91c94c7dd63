"""Every init kind ``common.weights`` reads is documented where users look for it: the README's list of weight
imports and the spec table of docs/finetune.md (both written by hand, so a new reader must be added there too)."""

from pathlib import Path

import pytest

from common.weights import INIT_KINDS

ROOT = Path(__file__).resolve().parents[2]
PREFIXED = [kind for kind in INIT_KINDS if kind not in ("scratch", "export")]  # the KIND:PATH specs


@pytest.mark.parametrize("doc, form", [("README.md", "`{}:`"), ("docs/finetune.md", "| `{}:")])
def test_every_init_kind_is_documented(doc, form):
    text = (ROOT / doc).read_text()
    missing = [kind for kind in PREFIXED if form.format(kind) not in text]
    assert not missing, f"{doc} does not list the init kinds {missing}"
