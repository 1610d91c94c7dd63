"""A tiny pre-training run writes the export folder with its card, and a fine-tune takes the folder as init."""

from __future__ import annotations

import json

import pytest

from finetune.cli import main as finetune_main
from pretrain.cli import main as pretrain_main
from tests.finetune.conftest import write_cohort
from tests.pretrain.conftest import tiny_config, write_yaml


@pytest.mark.slow
def test_pretrain_writes_the_export_folder_and_finetune_loads_it(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(train={"steps": 3, "checkpoint_every": 0, "image_every": 0}))
    out = tmp_path / "pre"
    assert pretrain_main(["--corpus", "synthmri", "--config", cfg, "--out", str(out)]) == 0
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
    assert "with **masked autoencoding (MAE)** on **synthetic brain MRI" in card  # the registries' words
    assert "Training loss" in card and "load_export(" in card

    front = card.split("---\n")[1]
    assert "license: apache-2.0" in front and "generated_by: synth, on the fly" in front  # the card's data summary
    assert config["training_data"]["synthmri"]["seed"] == 0 and config["images_seen"] == 3 * 2
    assert config["preprocessing"]["crop_foreground"] is False and config["arch"]["kwargs"]["mlp_ratio"] == 4.0
    assert str(tmp_path) not in card and str(tmp_path) not in (export / "config.json").read_text()

    manifest = write_cohort(tmp_path / "ad", "ad", n_subjects=12)
    code = finetune_main(
        ["run", "--task", "ad", "--manifest", str(manifest), "--mode", "linear", "--init", str(export),
         "--out", str(tmp_path / "ft"), "data.shape=[16,16,16]", "data.num_workers=0", "protocol.folds=2",
         "bootstrap=10"]
    )  # fmt: skip
    assert code == 0  # no backbone flags: the export's config.json rebuilds its architecture
    report = json.loads((tmp_path / "ft" / "weights_report.json").read_text())
    assert report["source"] == str(export / "model.safetensors") and report["loaded"] and not report["missing"]
    assert not report["resized"]
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["backbone"] == "vit_base_p16"
