"""Export folders: model.safetensors + config.json + README.md card, loadable as a folder and as the file."""

from __future__ import annotations

import json

import pytest
import torch

from common.checkpoint import load_export
from common.errors import CheckpointError
from common.export import export_folder, loss_summary
from common.models import create_backbone
from common.weights import load_backbone

META = {
    "spacing": [4.0, 4.0, 4.0],
    "intensity": "percentile",
    "percentiles": [0.5, 99.5],
    "crop_foreground": False,
    "corpus": "synthmri",
    "objective": "mae",
}


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1)
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 2.0 - 0.1 * s, "lr": 1e-3}) for s in range(1, 11)]
    metrics.write_text("\n".join(lines) + '\n{"step": 11, "lo')  # the last line cut by a killed run
    return model, export_folder(model, tmp_path / "export", {**META, "step": 10, "steps": 20}, metrics)


def test_folder_holds_weights_config_and_card(folder):
    model, path = folder
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    config = json.loads((path / "config.json").read_text())
    assert config["arch"] == model.arch and config["input_size"] == [16, 16, 16]
    assert config["preprocessing"] == {
        "orientation": "RAS",
        "spacing": [4.0, 4.0, 4.0],
        "interpolation": "trilinear",
        "crop_foreground": False,
        "shape": [16, 16, 16],
        "pad_crop": "centred, zero padding",
        "intensity": "percentile",
        "intensity_mask": "non-zero voxels",
        "percentiles": [0.5, 99.5],
        "channels": 1,
        "layout": config["preprocessing"]["layout"],
    }
    assert (config["corpus"], config["objective"], config["step"], config["steps"]) == ("synthmri", "mae", 10, 20)
    assert config["package_version"] and config["training"]["lowest"] == {"step": 10, "loss": pytest.approx(1.0)}
    card = (path / "README.md").read_text()
    assert 'load_export("export")' in card and "--init export" in card
    assert "4 × 4 × 4 mm, trilinear" in card and "`percentile`, statistics over the non-zero voxels" in card
    assert "RAS+" in card and "| foreground crop | none" in card
    assert "lowest 1 at step 10" in card and "10 optimizer steps of 20 planned" in card


def test_folder_and_its_file_load_as_the_same_export(folder):
    model, path = folder
    rebuilt, meta = load_export(path)
    assert meta["corpus"] == "synthmri"
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)
    fresh = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1)
    report = load_backbone(fresh, str(path))
    assert report.source.endswith("model.safetensors") and not report.missing
    single = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1)
    assert not load_backbone(single, str(path / "model.safetensors")).missing  # the file alone still works


def test_a_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an export folder"):
        load_export(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not an export folder"):
        load_backbone(create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1), str(tmp_path / "empty"))


def test_loss_summary_skips_nonfinite_and_cut_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": NaN}\n{"step": 3, "loss": 1.5}\n{"st')
    summary = loss_summary(path)
    assert summary["logged_steps"] == 2 and summary["last"] == {"step": 3, "loss": 1.5}
    assert loss_summary(tmp_path / "none.jsonl") is None
