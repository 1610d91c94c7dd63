"""synth/ldm/sampling.py and the ldm-sample CLI: conditioning, seeds, a resumable corpus."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data import read_manifest
from common.errors import ConfigError
from synth.dataset import GeneratedDirectory
from synth.ldm.cli import main
from synth.ldm.load import load_model
from synth.ldm.sampling import generate, sample_to_directory


def test_conditioning_changes_the_sample_and_seed_fixes_it(run):
    model = load_model(run)
    young_old = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.5, 0.5]])
    a = generate(model, young_old, seeds=[7, 7], ddim_steps=3)  # same noise, different age
    assert a.shape == (2, 1, 16, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert (a[0] - a[1]).abs().max() > 1e-4
    b = generate(model, young_old[1:], seeds=[7], ddim_steps=3)
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=1e-4)  # deterministic per seed, batch-independent


def test_sample_cli_writes_a_corpus_and_resumes(run, tmp_path, capsys):
    out = tmp_path / "corpus"
    args = [
        "ldm-sample",
        "--model",
        str(run),
        "--out",
        str(out),
        "--age",
        "50",
        "--sex",
        "F",
        "--ddim-steps",
        "2",
        "--seed",
        "3",
        "--no-progress",
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]
    assert main([*args, "--n", "2", "--ddim-steps", "0"]) == 2  # not silently the default 50
    assert "--ddim-steps must be >= 1" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--n", "2"]) == 0
    first = out / "images" / "sub-000000.nii.gz"
    stamp = first.stat().st_mtime_ns
    assert main([*args, "--n", "3", "--batch-size", "2"]) == 0  # grows the corpus, keeps what exists
    assert first.stat().st_mtime_ns == stamp
    df = read_manifest(out / "manifest.csv")  # the project's manifest: paths resolve, columns present
    assert len(df) == 3 and set(df["sex"]) == {"F"} and np.allclose(df["age"], 50)
    assert {"seed", "index", "ventricle_volume", "brain_volume", "cond_age"} <= set(df.columns)
    assert df["ventricle_volume"].nunique() > 1  # not fixed: drawn from the training subjects
    assert GeneratedDirectory(out)[2].shape == (1, 16, 16, 16)  # read as the anatomy-model corpora are
    img = nib.load(first)
    assert img.shape == (16, 16, 16) and np.allclose(img.header.get_zooms(), 2.0)
    # same settings, other folder: identical volumes (deterministic per seed)
    again = tmp_path / "again"
    sample_to_directory(
        load_model(run), again, n=1, seed=3, fixed={"age": 50, "sex": 0}, ddim_steps=2, show_progress=False
    )
    np.testing.assert_allclose(nib.load(again / "images" / "sub-000000.nii.gz").get_fdata(), img.get_fdata(), atol=1e-5)
    with pytest.raises(ConfigError, match="other settings"):
        sample_to_directory(load_model(run), out, n=3, seed=4, ddim_steps=2, show_progress=False)
