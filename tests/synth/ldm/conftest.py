"""LDM fixtures: a toy labelled corpus and a tiny trained run, made once per session for the synth/ldm tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ldm_toys import TINY, toy_brain

from common.data import write_nifti
from synth.ldm.cli import main


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # these networks are tiny: one thread is faster, and avoids spin-waiting on a shared, busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ldm_data")
    rows = []
    for i, age in enumerate(np.linspace(20, 80, 6)):
        image, labels = toy_brain(age)
        write_nifti(image, root / f"img{i}.nii.gz", spacing=(2, 2, 2))
        write_nifti(labels, root / f"lab{i}.nii.gz", spacing=(2, 2, 2), dtype=np.uint8)
        rows.append(
            {
                "path": f"img{i}.nii.gz",
                "subject_id": f"s{i}",
                "session_id": "ses-1",
                "site": "a",
                "dataset": "toy",
                "age": age,
                "sex": "FM"[i % 2],
                "diagnosis": "CN",
                "label_path": f"lab{i}.nii.gz",
            }
        )
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


@pytest.fixture(scope="session")
def run(corpus, tmp_path_factory) -> Path:
    """A tiny LDM trained 2 + 2 steps, then resumed to 3 + 3."""
    out = tmp_path_factory.mktemp("ldm_run") / "run"
    steps = ["train_autoencoder.steps=2", "train_diffusion.steps=2"]
    assert main(["ldm-train", "--manifest", str(corpus), "--out", str(out), *TINY, *steps]) == 0
    more = ["train_autoencoder.steps=3", "train_diffusion.steps=3"]
    assert main(["ldm-train", "--out", str(out), "--resume", *more]) == 0
    return out
