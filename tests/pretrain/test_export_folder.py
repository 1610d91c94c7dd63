"""A tiny pre-training run writes the export folder with its card, and a fine-tune takes the folder as init."""

from __future__ import annotations

import json

import pytest

from finetune.cli import main as finetune_main
from pretrain.cli import main as pretrain_main
from tests.finetune.conftest import write_cohort
from tests.pretrain.conftest import TINY_VIT, tiny_config, write_yaml


@pytest.mark.slow
def test_pretrain_writes_the_export_folder_and_finetune_loads_it(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(train={"steps": 3, "checkpoint_every": 0, "image_every": 0}))
    out = tmp_path / "pre"
    assert pretrain_main(["--corpus", "synthmri", "--config", cfg, "--output", str(out)]) == 0
    export = out / "export"
    assert {"model.safetensors", "config.json", "README.md", "encoder.safetensors"} <= {
        p.name for p in export.iterdir()
    }
    assert (export / "encoder.safetensors").read_bytes() == (export / "model.safetensors").read_bytes()
    config = json.loads((export / "config.json").read_text())
    assert config["corpus"] == "synthmri" and config["objective"] == "mae" and config["precision"] == "fp32"
    assert config["step"] == config["steps"] == 3 and config["training"]["logged_steps"] == 3
    assert config["preprocessing"]["spacing"] == [4.0, 4.0, 4.0] and config["arch"]["name"] == "vit_base_p16"
    card = (export / "README.md").read_text()
    assert "mae" in card and "Training loss" in card and "load_export(" in card

    manifest = write_cohort(tmp_path / "ad", "ad", n_subjects=12)
    kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_VIT.items()) + "}"
    code = finetune_main(
        ["run", "--task", "ad", "--manifest", str(manifest), "--backbone", "vit_base_p16", "--mode", "linear",
         "--init", str(export), "--out", str(tmp_path / "ft"), f"backbone.kwargs={kwargs}",
         "data.shape=[16,16,16]", "data.num_workers=0", "protocol.folds=2", "bootstrap=10"]
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "ft" / "weights_report.json").read_text())
    assert report["source"] == str(export / "model.safetensors") and report["loaded"] and not report["missing"]
