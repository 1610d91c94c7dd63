"""``monai:`` import checked against MONAI's own ViT and MaskedAutoEncoderViT (random weights, no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from monai.networks.blocks import SABlock
from monai.networks.nets import MaskedAutoEncoderViT, ViT
from torch import nn

from common.errors import CheckpointError
from common.models import create_backbone
from common.weights import load_backbone

IMG, PATCH, DIM, DEPTH, HEADS = (16, 32, 32), (4, 8, 8), 48, 2, 4  # anisotropic: axis order must be right
MONAI_LAYOUT = dict(class_token=False, global_pool="avg", fc_norm=False, pos_embed="learn", norm_eps=1e-5)


def _randomise(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.2)  # every tensor matters, biases and norms included
    return model.eval()


def _ours(img=IMG, **kwargs) -> nn.Module:
    layout = {**MONAI_LAYOUT, **kwargs}
    return create_backbone(
        "vit_tiny_p16",
        img_size=img,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=2.0,
        **layout,
    ).eval()


def _monai_vit(proj_type: str, split_qkv: bool = False, **kwargs) -> nn.Module:
    vit = ViT(
        in_channels=1,
        img_size=IMG,
        patch_size=PATCH,
        hidden_size=DIM,
        mlp_dim=2 * DIM,
        num_layers=DEPTH,
        num_heads=HEADS,
        proj_type=proj_type,
        classification=False,
        **kwargs,
    )
    if split_qkv:  # MONAI's SABlock with separate to_q / to_k / to_v (ViT does not pass the flag through)
        for block in vit.blocks:
            block.attn = SABlock(DIM, HEADS, qkv_bias=True, use_combined_linear=False)
    return _randomise(vit)


def _monai_mae() -> nn.Module:
    return _randomise(
        MaskedAutoEncoderViT(
            in_channels=1,
            img_size=IMG,
            patch_size=PATCH,
            hidden_size=DIM,
            mlp_dim=2 * DIM,
            num_layers=DEPTH,
            num_heads=HEADS,
            decoder_hidden_size=DIM,
            decoder_mlp_dim=DIM,
            decoder_num_layers=1,
            decoder_num_heads=HEADS,
        )
    )


@pytest.mark.parametrize("proj_type", ["conv", "perceptron"])
def test_monai_vit_features_match_monai(tmp_path, proj_type):
    monai_vit = _monai_vit(proj_type)
    torch.save(monai_vit.state_dict(), tmp_path / "vit.pt")
    ours = _ours()
    report = load_backbone(ours, f"monai:{tmp_path / 'vit.pt'}")
    x = torch.randn(2, 1, *IMG)
    with torch.no_grad():
        expected = monai_vit(x)[0].mean(dim=1)  # (B, N, C) tokens -> their mean
        got = ours.forward_features(x)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert all(k.endswith("norm_cross_attn.weight") or k.endswith("norm_cross_attn.bias") for k in report.unexpected)
    assert not report.missing
    assert any("qkv bias set to zero" in n for n in report.notes)


def test_monai_qkv_bias_and_split_projections_import(tmp_path):
    monai_vit = _monai_vit("conv", split_qkv=True, qkv_bias=True)
    torch.save(monai_vit.state_dict(), tmp_path / "vit.pt")
    ours = _ours()
    report = load_backbone(ours, f"monai:{tmp_path / 'vit.pt'}")
    x = torch.randn(1, 1, *IMG)
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(x), monai_vit(x)[0].mean(dim=1), atol=1e-4)
    assert not any("qkv bias" in n for n in report.notes)


def test_lightning_wrapped_mae_imports_and_matches_its_encoder(tmp_path):
    mae = _monai_mae()
    lightning = {"state_dict": {f"model.{k}": v for k, v in mae.state_dict().items()}, "epoch": 7, "global_step": 70}
    torch.save(lightning, tmp_path / "last.ckpt")
    ours = _ours(class_token=True)  # MAE has a cls token (without position), mean-pooling skips it
    report = load_backbone(ours, f"monai:{tmp_path / 'last.ckpt'}")
    x = torch.randn(2, 1, *IMG)
    with torch.no_grad():
        tokens = mae.patch_embedding(x)  # (B, N, C), position added; MONAI's forward would mask them
        tokens = mae.blocks(torch.cat([mae.cls_token.expand(2, -1, -1), tokens], dim=1))  # blocks + final norm
        expected = tokens[:, 1:].mean(dim=1)
        got = ours.forward_features(x)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert "cls_token" in report.loaded and "norm.weight" in report.loaded
    assert any(k.startswith("decoder_") for k in report.unexpected)
    assert any("'model.'" in n for n in report.notes)


def test_model_built_another_way_gets_what_fits_and_the_report_says_why(tmp_path):
    torch.save(_monai_vit("conv").state_dict(), tmp_path / "vit.pt")
    ours = _ours(img=(32, 32, 32), fc_norm=True, norm_eps=1e-6)  # other grid, fc_norm, timm's eps
    report = load_backbone(ours, f"monai:{tmp_path / 'vit.pt'}")
    assert "pos_embed" in report.resized  # (4, 4, 4) grid resampled to (8, 4, 4)
    assert "norm.weight" in report.unexpected and "fc_norm.weight" in report.missing
    text = report.summary()
    assert "norm_eps=1e-05" in text and "fc_norm=False" in text


def test_non_vit_backbone_and_foreign_file_are_refused(tmp_path):
    torch.save(_monai_vit("conv").state_dict(), tmp_path / "vit.pt")
    with pytest.raises(CheckpointError, match="only a ViT"):
        load_backbone(create_backbone("resnet18", img_size=16), f"monai:{tmp_path / 'vit.pt'}")
    torch.save({"conv1.weight": torch.zeros(4, 1, 3, 3, 3)}, tmp_path / "cnn.pt")
    with pytest.raises(CheckpointError, match="not a MONAI ViT checkpoint"):
        load_backbone(_ours(), f"monai:{tmp_path / 'cnn.pt'}")


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_needs_code_is_refused_with_the_conversion_command(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = {"state_dict": _monai_vit("conv").state_dict(), "hyper_parameters": _Payload(str(marker))}
    torch.save(ckpt, tmp_path / "bad.ckpt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="weights_only=False") as err:
        load_backbone(_ours(), f"monai:{tmp_path / 'bad.ckpt'}")
    assert "refused" in str(err.value) and str(tmp_path / "bad.ckpt") in str(err.value)
    assert not os.path.exists(marker)
