"""``train.mode=lora`` through peft: a tiny grid on a ViT and a CNN, what is trainable, what is saved."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from common.errors import ConfigError
from common.models import create_backbone
from finetune.cli import main
from finetune.config import LoraSettings
from finetune.heads import FineTuneModel
from finetune.modes.lora import add_lora, load_fold, parameter_counts, trained_state

GRID_YAML = """
tasks: {{ad: {ad}}}
backbones:
  - {{label: vit, name: vit_small_p16, kwargs: {{patch_size: 8, depth: 2}}}}
  - {{label: cnn, name: resnet18, kwargs: {{widen_factor: 0.5}}}}
inits:
  - {{name: lora, spec: scratch, overrides: [train.mode=lora]}}
  - {{name: full, spec: scratch}}
fractions: [1.0]
seeds: [0]
base:
  data: {{shape: [16, 16, 16], num_workers: 0}}
  train: {{mode: full, epochs: 2, lora: {{rank: 4}}}}
  optim: {{warmup_epochs: 1}}
  protocol: {{folds: 2}}
  bootstrap: 20
"""


@pytest.mark.slow
def test_lora_runs_in_the_grid_on_a_vit_and_a_cnn_and_saves_only_what_it_trained(ad_cohort, tmp_path):
    config = tmp_path / "grid.yaml"
    config.write_text(GRID_YAML.format(ad=ad_cohort))
    out = tmp_path / "grid"
    assert main(["benchmark", "--config", str(config), "--out", str(out)]) == 0
    results = pd.read_csv(out / "results.csv")
    assert set(zip(results["backbone"], results["mode"])) == {
        ("vit", "lora"),
        ("vit", "full"),
        ("cnn", "lora"),
        ("cnn", "full"),
    }
    assert results["roc_auc"].between(0, 1).all()
    for backbone in ("vit", "cnn"):
        cell = out / f"cells/ad/{backbone}/lora/frac1/seed0"
        folds = json.loads((cell / "metrics.json").read_text())["folds"]
        assert len(folds) == 2 and all(0 < f["trainable_fraction"] < 0.05 for f in folds), folds
        with safe_open(cell / "adapters/fold0.safetensors", "pt") as f:
            keys = list(f.keys())
            saved = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
            meta = json.loads(f.metadata()["lora"])
        assert any("lora_A" in k for k in keys) and any(k.startswith("head.fc.") for k in keys)
        assert not any(k.endswith("base_layer.weight") for k in keys)  # the frozen backbone is not copied
        assert saved < 0.06 * folds[0]["backbone_params"]  # adapters, norms (+ running stats), head
        assert meta["rank"] == 4 and meta["targets"]
        assert not (out / f"cells/ad/{backbone}/full/frac1/seed0/adapters").exists()


@pytest.mark.parametrize(
    "name, kwargs, adapted",
    [
        ("vit_small_p16", {"patch_size": 8, "depth": 2}, "blocks.0.attn.qkv"),
        ("resnet18", {"widen_factor": 0.5}, "net.layer1.0.conv1"),
    ],
)
def test_lora_freezes_the_backbone_but_adapters_and_norms(name, kwargs, adapted):
    backbone = add_lora(create_backbone(name, img_size=16, **kwargs), LoraSettings(rank=4))
    model = FineTuneModel(backbone, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert f"backbone.{adapted}.lora_A.default.weight" in trainable
    assert f"backbone.{adapted}.base_layer.weight" not in trainable
    assert any(".norm" in n or ".bn" in n for n in trainable) and "head.fc.weight" in trainable
    counts = parameter_counts(model)
    assert 0 < counts["trainable_fraction"] < 0.05, counts
    x = torch.randn(2, 1, 16, 16, 16)
    assert model(x).shape == (2, 2)  # a fresh adapter (B = 0) leaves the backbone's output unchanged
    base = create_backbone(name, img_size=16, **kwargs)
    base.load_state_dict(
        {k.replace(".base_layer", ""): v for k, v in backbone.state_dict().items() if "lora_" not in k}
    )
    with torch.no_grad():
        assert torch.allclose(backbone.eval().forward_features(x), base.eval().forward_features(x), atol=1e-5)


def test_a_saved_fold_restores_the_trained_model(tmp_path):
    torch.manual_seed(0)
    base = create_backbone("resnet18", img_size=16, widen_factor=0.5)
    trained = FineTuneModel(add_lora(copy.deepcopy(base), LoraSettings(rank=2)), 3)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # stands in for training: adapters, norms and head all move
    trained.train()(torch.randn(4, 1, 16, 16, 16))  # and the BatchNorm running statistics
    meta = {"rank": 2, "alpha": 16.0, "dropout": 0.0, "targets": ["Conv3d"]}
    save_file(trained_state(trained), tmp_path / "fold0.safetensors", metadata={"lora": json.dumps(meta)})
    restored = load_fold(tmp_path / "fold0.safetensors", copy.deepcopy(base))
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(restored(x), trained.eval()(x), atol=1e-5)


def test_lora_targets_that_match_nothing_or_peft_cannot_adapt_are_config_errors():
    backbone = create_backbone("vit_small_p16", img_size=16, patch_size=8, depth=1)
    with pytest.raises(ConfigError, match="match no module"):
        add_lora(backbone, LoraSettings(targets=["attn.nothing"]))
    with pytest.raises(ConfigError, match="cannot put LoRA"):
        add_lora(nn.Sequential(nn.BatchNorm3d(2)), LoraSettings(targets=["0"]))
    with pytest.raises(ConfigError, match="rank >= 1"):
        add_lora(backbone, LoraSettings(rank=0))
