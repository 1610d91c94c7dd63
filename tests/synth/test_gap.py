"""The domain gap: two folders of one config cannot be told apart, the corpus and a shifted domain can."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.config import load_config, to_object
from synth.cli import main
from synth.cohort import Job, generate
from synth.config import SynthConfig
from synth.gap import domain_gap

pytestmark = pytest.mark.usefixtures("one_thread")
SHIFTED = Path(__file__).parents[2] / "configs" / "synth" / "shifted.yaml"
N = 20


def _folder(root: Path, name: str, seed: int, config: Path | None = None, *overrides: str) -> Path:
    cfg = to_object(load_config(SynthConfig, config, ["spacing=4.0", *overrides]))
    generate(root / name, cfg, Job(seed=seed), N, workers=1, show_progress=False)
    return root / name


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gap")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            "corpus": _folder(root, "corpus", 1),
            "corpus_again": _folder(root, "corpus_again", 2),  # the same config, other subjects
            # strongly shifted: the shifted domain with grey matter almost as bright as white matter (its own
            # contrast change needs more than 20 + 20 volumes to show in a histogram of z-scores)
            "shifted": _folder(root, "shifted", 3, SHIFTED, "intensity.t1_gm=0.64", "intensity.t1_site_sd=0.02"),
        }
    finally:
        torch.set_num_threads(before)


def test_one_config_gives_no_gap_and_the_shifted_domain_a_large_one(folders):
    same = domain_gap(folders["corpus"], folders["corpus_again"])
    shifted = domain_gap(folders["corpus"], folders["shifted"])
    assert same["n_a"] == same["n_b"] == N and len(same["voxels"]["folds"]) == 5
    for name in ("voxels", "histogram"):
        assert abs(same[name]["roc_auc"] - 0.5) < 0.3, name  # chance, within what 20 + 20 volumes allow
        assert shifted[name]["roc_auc"] > 0.9, name


def test_gap_command_prints_and_writes_the_figures(folders, tmp_path, capsys):
    out = tmp_path / "gap.json"
    code = main(["gap", "--a", str(folders["corpus"]), "--b", str(folders["shifted"]), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "voxels: ROC-AUC" in printed and "histogram: ROC-AUC" in printed
    written = json.loads(out.read_text())
    assert set(written) == {"n_a", "n_b", "voxels", "histogram"} and written["voxels"]["roc_auc"] > 0.9


def test_gap_needs_a_folder_with_volumes(folders, tmp_path, capsys):
    assert main(["gap", "--a", str(folders["corpus"]), "--b", str(tmp_path)]) == 2
    assert "manifest" in capsys.readouterr().err
