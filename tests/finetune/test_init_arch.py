"""``finetune run --init EXPORT`` rebuilds the export's own architecture; a config that contradicts it, or a load
that would leave backbone tensors as initialised or resize them, is refused naming the fix."""

from __future__ import annotations

import json

import pytest

from common.checkpoint import export_backbone
from common.errors import CheckpointError, ConfigError
from common.export import export_folder
from common.models import create_backbone
from finetune.cli import main
from finetune.config import RunConfig
from finetune.run import prepare

EXPORTED = {"patch_size": 8, "depth": 1, "mlp_ratio": 2.0, "norm_eps": 1e-5}  # none of them vit_small's default


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    model = create_backbone("vit_small_p16", img_size=16, **EXPORTED)
    return export_folder(
        model, tmp_path_factory.mktemp("pre") / "export", {"spacing": [2.0] * 3, "intensity": "zscore"}
    )


def _config(manifest, init, **model) -> RunConfig:
    cfg = RunConfig(task="ad", manifest=str(manifest), init=str(init))
    cfg.data.shape, cfg.data.num_workers = [16, 16, 16], 0
    cfg.protocol.folds = 3
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def test_an_export_init_alone_rebuilds_its_architecture_and_loads_every_tensor(ad_cohort, export):
    prep = prepare(_config(ad_cohort, export))
    arch = prep.backbone.arch
    assert arch["name"] == "vit_small_p16" and {k: arch["kwargs"][k] for k in EXPORTED} == EXPORTED
    assert prep.report.loaded and not prep.report.missing and not prep.report.resized
    same = prepare(_config(ad_cohort, export, backbone="vit_small_p16", kwargs={"depth": 1, "drop_path_rate": 0.1}))
    assert same.backbone.arch["kwargs"]["drop_path_rate"] == 0.1  # a training setting may differ from the export's


def test_a_backbone_or_kwargs_that_contradict_the_export_are_refused_naming_both(ad_cohort, export):
    with pytest.raises(
        ConfigError, match=r"'vit_tiny_p16' \(--backbone\) differs .* is a 'vit_small_p16'; leave it out"
    ):
        prepare(_config(ad_cohort, export, backbone="vit_tiny_p16"))
    with pytest.raises(ConfigError, match=r"depth=12 \(the export's depth=1\); leave it out"):
        prepare(_config(ad_cohort, export, kwargs={"depth": 12}))


def test_a_partial_load_of_our_own_weights_is_refused_unless_asked(ad_cohort, tmp_path, capsys):
    """A one-block ViT exported for 16³ volumes, fine-tuned on 32³ ones: its position grid would be resampled."""
    path = export_backbone(
        create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1),
        tmp_path / "e.safetensors",
        {"spacing": [2.0] * 3, "intensity": "zscore"},
    )
    cfg = _config(ad_cohort, path)
    cfg.data.shape = [32, 32, 32]
    with pytest.raises(CheckpointError, match=r"would resize 1 \(pos_embed .*--allow-partial, or allow_partial_init"):
        prepare(cfg)
    cfg.allow_partial_init = True
    assert "pos_embed" in prepare(cfg).report.resized

    args = ["run", "--task", "ad", "--manifest", str(ad_cohort), "--init", str(path), "--mode", "linear"]
    args += ["--out", str(tmp_path / "run"), "data.shape=[32,32,32]", "data.num_workers=0", "protocol.folds=2"]
    args += ["bootstrap=10", "classical_pool=0"]
    assert main(args) == 2  # the architecture is the export's, but not its input size
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "would resize 1 (pos_embed" in err and "\n" not in err
    assert main([*args, "--allow-partial"]) == 0
    report = json.loads((tmp_path / "run" / "weights_report.json").read_text())
    assert list(report["resized"]) == ["pos_embed"] and not report["missing"]
