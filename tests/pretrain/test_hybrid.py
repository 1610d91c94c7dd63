"""MAE + contrastive (``mae_contrastive``): one encoder pass over both views' visible tokens, MAE's loss on each
view's masked patches plus the weighted NT-Xent of the pooled visible tokens, the encoder learning from both, and
MAE's export, which a fine-tune loads."""

import json

import pytest
import torch

from common.config import load_config
from common.errors import ConfigError
from common.models import create_backbone
from finetune.cli import main as finetune_main
from pretrain.cli import main as pretrain_main
from pretrain.config import PretrainConfig, validate
from pretrain.objectives import ContrastiveMaskedAutoencoder
from pretrain.objectives.simclr import nt_xent
from tests.finetune.conftest import write_cohort
from tests.pretrain.conftest import tiny_config, write_yaml
from tests.pretrain.test_learns import subject


def tiny(weight: float = 0.5) -> ContrastiveMaskedAutoencoder:
    """A 2-block 32-wide ViT with mean pooling on 16³ (64 tokens of 4³) and a 1-block decoder."""
    enc = create_backbone(
        "vit_tiny_p16", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=4, global_pool="avg",
        class_token=False,
    )  # fmt: skip
    return ContrastiveMaskedAutoencoder(enc, 0.75, "random", True, 32, 1, 4, 32, 16, 0.2, contrastive_weight=weight)


def flip_views(n: int = 4) -> dict[str, torch.Tensor]:
    """Procedural subjects 0..n-1 and their left-right flips: the views a ViT learns from."""
    volumes = torch.stack([subject(i)[0] for i in range(n)])  # (n, 1, 16, 16, 16)
    return {"view1": volumes, "view2": volumes.flip(2)}


def test_one_encoder_pass_sees_both_views_visible_tokens_and_the_loss_is_mae_plus_weighted_nt_xent():
    model = tiny(weight=0.5)
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, inputs, out: seen.append(tuple(inputs[0].shape)))
    batch = flip_views(4)
    out = model(batch)
    assert seen == [(8, 16, 32)]  # one pass: 2 views × 4 volumes, 16 of 64 tokens visible, no cls token
    assert out["pred"].shape == (8, 64, 64) and out["mask"].shape == (8, 64)
    assert torch.equal(out["mask"].sum(1), torch.full((8,), 48.0))
    assert not torch.equal(out["mask"][:4], out["mask"][4:])  # each view draws its own mask
    imgs = torch.cat([batch["view1"], batch["view2"]])
    assert out["reconstruction"].item() == pytest.approx(model.forward_loss(imgs, out["pred"], out["mask"]).item())
    assert out["loss"].item() == pytest.approx(out["reconstruction"].item() + 0.5 * out["contrastive"].item())
    alike = nt_xent(torch.ones(4, 16), torch.ones(4, 16), 0.2).item()  # chance level ln 7
    assert 0 < out["contrastive"].item() < 3 * alike
    assert set(model.images(batch, out)) == {"input", "masked", "reconstruction"}  # MAE's slices of view 1


def encoder_grads(weight: float) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the same initial weights ...
    model = tiny(weight)
    torch.manual_seed(1)  # ... and the same masks for every weight
    model(flip_views(4))["loss"].backward()
    return {name: p.grad.clone() for name, p in model.encoder.named_parameters() if p.grad is not None}


def test_the_encoder_learns_from_both_terms():
    alone, both = encoder_grads(0.0), encoder_grads(1.0)
    qkv = "blocks.0.attn.qkv.weight"
    assert alone[qkv].abs().sum() > 0  # the reconstruction reaches the encoder ...
    assert not torch.allclose(alone[qkv], both[qkv], atol=1e-6)  # ... and so does the contrastive term
    # the pooled features' norm lies on the contrastive path only (MAE decodes the tokens before pooling)
    assert alone["fc_norm.weight"].abs().sum() == 0 and both["fc_norm.weight"].abs().sum() > 0


def test_both_terms_fall_over_a_few_steps():
    torch.manual_seed(0)
    model = tiny(weight=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = flip_views(4)
    history = []
    for _ in range(25):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append((out["loss"].item(), out["reconstruction"].item(), out["contrastive"].item()))
    first, last = torch.tensor(history[:3]).mean(0), torch.tensor(history[-3:]).mean(0)
    assert torch.isfinite(torch.tensor(history)).all()
    assert (last < 0.8 * first).all(), f"loss, reconstruction, contrastive: {first.tolist()} -> {last.tolist()}"


def test_the_weight_is_checked_and_the_objective_needs_a_vit():
    overrides = ["objective.name=mae_contrastive", "objective.hybrid.contrastive_weight=-1"]
    with pytest.raises(ConfigError, match="objective.hybrid.contrastive_weight must be >= 0, got -1"):
        validate(load_config(PretrainConfig, None, overrides))
    with pytest.raises(ConfigError, match="MAE needs a ViT backbone"):
        ContrastiveMaskedAutoencoder(create_backbone("resnet18", img_size=16, widen_factor=0.25))


@pytest.mark.slow
def test_a_mae_contrastive_run_exports_mae_s_encoder_and_finetune_loads_it(tmp_path):
    objective = {"name": "mae_contrastive", "hybrid": {"contrastive_weight": 0.5}}
    settings = tiny_config(objective=objective, train={"steps": 3, "checkpoint_every": 0, "image_every": 2})
    settings["objective"]["contrastive"].update(crop_scale=[1.0, 1.0], affine_prob=0.0, intensity_prob=0.0)
    out, cfg = tmp_path / "pre", write_yaml(tmp_path / "c.yaml", settings)  # image_every 2: MAE's slices logged
    assert pretrain_main(["--corpus", "synthmri", "--config", cfg, "--out", str(out)]) == 0
    export = out / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["objective"] == "mae_contrastive" and config["arch"]["name"] == "vit_base_p16"
    card = (export / "README.md").read_text()
    assert "with **masked autoencoding with a contrastive term (MAE + NT-Xent, as CAN)**" in card

    manifest = write_cohort(tmp_path / "ad", "ad", n_subjects=12)
    code = finetune_main(
        ["run", "--task", "ad", "--manifest", str(manifest), "--mode", "linear", "--init", str(export),
         "--out", str(tmp_path / "ft"), "data.shape=[16,16,16]", "data.num_workers=0", "protocol.folds=2",
         "bootstrap=10"]
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "ft" / "weights_report.json").read_text())
    assert report["loaded"] and not report["missing"] and not report["resized"]
