"""The pre-training config's checks: every allowed-value list and range is checked in ``validate`` and the
error names the config key; objectives declare what they need."""

from pathlib import Path

import pytest

from common.config import load_config
from common.errors import ConfigError
from common.models import create_backbone
from pretrain.config import PretrainConfig, validate
from pretrain.objectives import build_objective


@pytest.mark.parametrize(
    "override, message",
    [
        ("corpus=books", "corpus must be one of"),
        ("objective.name=byol", "objective.name must be one of"),
        ("objective.mae.masking=block", "objective.mae.masking must be one of"),
        ("objective.mae.mask_ratio=1.0", r"objective.mae.mask_ratio must lie in \(0, 1\)"),
        ("objective.mae.decoder_heads=5", "objective.mae.decoder_dim 384 is not divisible"),
        ("objective.contrastive.temperature=0", "objective.contrastive.temperature must be > 0"),
        ("objective.contrastive.crop_scale=[0.5,1.5]", "objective.contrastive.crop_scale"),
        ("data.video.reader=opencv", "data.video.reader must be one of"),
        ("data.shape=[8,8]", "data.shape must be three"),
        ("train.precision=on", "train.precision must be one of"),
        ("model.attn_backend=flash", "model.attn_backend must be one of"),
        ("train.steps=0", "train.steps and data.batch_size must be >= 1"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(PretrainConfig, None, [override]))


def test_the_defaults_and_shipped_recipes_are_valid():
    validate(load_config(PretrainConfig))
    for path in sorted((Path(__file__).resolve().parents[2] / "configs" / "pretrain").glob("*.yaml")):
        validate(load_config(PretrainConfig, path))


def test_objectives_declare_views_and_images():
    cfg = load_config(PretrainConfig, None, ["objective.mae.decoder_dim=24", "objective.mae.decoder_heads=2"])
    vit = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1, embed_dim=24, num_heads=2)
    cnn = create_backbone("resnet18", img_size=16, widen_factor=0.25)
    declared = {}
    for name, encoder in (("mae", vit), ("simclr", cnn), ("moco", cnn)):
        cfg.objective.name = name
        objective = build_objective(cfg.objective, encoder)
        declared[name] = (objective.needs_views, objective.image_tag, objective.updates_in_place)
    assert declared == {"mae": (False, "mae", False), "simclr": (True, None, False), "moco": (True, None, True)}
