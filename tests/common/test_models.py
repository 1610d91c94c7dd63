"""Backbone registry, ViT3D and the MONAI CNN wrappers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from monai.networks.nets import resnet18
from omegaconf import OmegaConf

from common.errors import ConfigError
from common.models import ViT3D, create_backbone, list_backbones, sincos_3d
from common.models.pos_embed import axis_channels

# a ViT small enough for CPU tests: 32³ volume, 8³ patches -> 64 tokens, width 32, 2 blocks
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)


def tiny_kwargs(name: str) -> dict:
    """The registry's real variants at test size: ViTs keep their width but run 2 blocks on 32³ (8 tokens);
    ResNets run on 16³; DenseNet's four 2x poolings need 32³."""
    if name.startswith("vit"):
        return dict(img_size=32, depth=2, drop_path_rate=0.1)
    return dict(img_size=16 if name.startswith("resnet") else 32)


def test_registry_has_the_required_backbones():
    names = set(list_backbones())
    assert {
        "vit_tiny_p16",
        "vit_small_p16",
        "vit_base_p16",
        "vit_large_p16",
        "densenet121",
        "resnet18",
        "resnet50",
    } <= names


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_trains_and_checkpointing_changes_nothing(name):
    torch.manual_seed(0)
    plain = create_backbone(name, **tiny_kwargs(name)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 1, *plain.img_size)

    outputs, grads = [], []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same drop-path draws in both runs
        out = model.forward_features(x)
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})

    assert outputs[0].shape == (2, plain.feature_dim)
    assert torch.isfinite(outputs[0]).all()
    assert all(g is not None and torch.isfinite(g).all() for g in grads[0].values())
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)
    # the recompute in backward must not update BatchNorm statistics a second time
    for (n, b0), (_, b1) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(b1, b0, msg=n)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        (
            "vit_tiny_p16",
            dict(
                img_size=(16, 32, 48),
                patch_size=(2, 16, 16),
                depth=1,
                global_pool="avg",
                class_token=False,
                pos_embed="learn",
            ),
        ),
        ("resnet18", dict(img_size=[16, 16, 16])),
    ],
)
def test_arch_rebuilds_the_same_model_after_json(name, kwargs):
    model = create_backbone(name, **kwargs).eval()
    arch = json.loads(json.dumps(model.arch))  # as it comes back from checkpoint metadata
    assert arch["name"] == name and arch["kwargs"]["in_chans"] == 1
    rebuilt = create_backbone(arch["name"], **arch["kwargs"]).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.arch == arch
    x = torch.randn(2, 1, *model.img_size)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_vit_parameter_names_follow_timm():
    model = create_backbone("vit_tiny_p16", img_size=32, depth=1)
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    expected = {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
    }
    expected |= {f"blocks.0.{m}.{p}" for m in block for p in ("weight", "bias")}
    assert set(model.state_dict()) == expected
    assert model.patch_embed.proj.weight.shape == (192, 1, 16, 16, 16)
    assert model.blocks[0].norm1.eps == 1e-6 and model.norm.eps == 1e-6
    assert model.blocks[0].mlp.act.approximate == "none"  # exact GELU


def test_vit_base_has_the_vit_b_size():
    with torch.device("meta"):  # counts parameters without allocating them
        model = create_backbone("vit_base_p16", img_size=96)
    C, blocks = 768, 12
    per_block = 12 * C * C + 13 * C  # qkv + proj + fc1 + fc2 (mlp ratio 4) weights and biases, two norms
    expected = blocks * per_block + (16**3 * C + C) + C + (1 + 6**3) * C + 2 * C  # + patch, cls, pos, norm
    assert sum(p.numel() for p in model.parameters()) == expected  # 88.37 M (2D ViT-B: 86.6 M, smaller patch)
    assert model.num_patches == 216 and model.grid_size == (6, 6, 6)


def test_sincos_3d_layout():
    assert axis_channels(768) == (256, 256, 256)
    assert axis_channels(1024) == (342, 342, 340)
    emb = sincos_3d(32, (2, 3, 4), cls_token=True)  # (1 + 24, 32); D gets 12 channels, H and W 10 each
    assert emb.shape == (25, 32)
    assert torch.equal(emb[0], torch.zeros(32))
    grid = emb[1:].reshape(2, 3, 4, 32)
    # moving along W changes only W's channels; along D only D's
    assert torch.equal(grid[0, 0, 0, :22], grid[0, 0, 3, :22]) and not torch.equal(
        grid[0, 0, 0, 22:], grid[0, 0, 3, 22:]
    )
    assert torch.equal(grid[0, 0, 0, 12:], grid[1, 0, 0, 12:]) and not torch.equal(
        grid[0, 0, 0, :12], grid[1, 0, 0, :12]
    )
    assert len({tuple(r.tolist()) for r in emb[1:]}) == 24  # every position distinct
    with pytest.raises(ConfigError, match="even"):
        sincos_3d(33, (2, 2, 2))


def test_pos_embed_is_fixed_or_learned():
    fixed = ViT3D(**TINY_VIT)
    assert not fixed.pos_embed.requires_grad
    torch.testing.assert_close(fixed.pos_embed[0], sincos_3d(32, (4, 4, 4), cls_token=True))
    assert ViT3D(**TINY_VIT, pos_embed="learn").pos_embed.requires_grad


def test_forward_tokens_keeps_the_given_tokens():
    torch.manual_seed(0)
    model = ViT3D(**TINY_VIT).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    full = model.forward_tokens(x)  # (2, 1 + 64, 32)
    assert full.shape == (2, 65, 32)
    assert model.patch_tokens(x).shape == (2, 64, 32)
    ids = torch.stack([torch.randperm(64)[:16] for _ in range(2)])  # (2, 16)
    kept = model.forward_tokens(x, ids_keep=ids)
    assert kept.shape == (2, 17, 32)
    # a permutation of all tokens permutes the outputs: the position embedding travels with each token
    perm = torch.stack([torch.randperm(64) for _ in range(2)])
    shuffled = model.forward_tokens(x, ids_keep=perm)
    expected = torch.gather(full[:, 1:], 1, perm.unsqueeze(-1).expand(-1, -1, 32))
    torch.testing.assert_close(shuffled[:, 1:], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shuffled[:, 0], full[:, 0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="ids_keep"):
        model.forward_tokens(x, ids_keep=ids.int())


@pytest.mark.parametrize("patch_size, in_chans", [((8, 8, 8), 1), ((2, 8, 4), 3)])
def test_patch_embedding_as_one_matmul_equals_the_strided_conv(patch_size, in_chans):
    """The unfolded-patch matmul (kept patches only) gives the conv's numbers and gradients, with the weight in
    the conv's (timm's) layout."""
    from common.models.vit import PatchEmbed3D

    torch.manual_seed(0)
    embed = PatchEmbed3D(patch_size, in_chans, 24)
    assert embed.proj.weight.shape == (24, in_chans, *patch_size)
    x = torch.randn(2, in_chans, 16, 16, 16)
    n = (16 // patch_size[0]) * (16 // patch_size[1]) * (16 // patch_size[2])
    ids = torch.stack([torch.randperm(n)[: n // 4] for _ in range(2)])  # (2, n/4) in shuffled order
    conv = embed(x).flatten(2).transpose(1, 2)  # (2, n, 24) raster order
    torch.testing.assert_close(embed.tokens(x), conv, rtol=1e-5, atol=1e-5)
    kept_conv = torch.gather(conv, 1, ids.unsqueeze(-1).expand(-1, -1, 24))
    kept = embed.tokens(x, ids)
    torch.testing.assert_close(kept, kept_conv, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(kept)
    conv_grads = torch.autograd.grad(kept_conv, [embed.proj.weight, embed.proj.bias], grad)
    matmul_grads = torch.autograd.grad(kept, [embed.proj.weight, embed.proj.bias], grad)
    for a, b in zip(matmul_grads, conv_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_avg_pool_without_cls_token_uses_fc_norm():
    model = ViT3D(**TINY_VIT, class_token=False, global_pool="avg").eval()
    names = set(model.state_dict())
    assert "cls_token" not in names and "fc_norm.weight" in names and "norm.weight" not in names
    assert model.num_prefix_tokens == 0 and model.pos_embed.shape == (1, 64, 32)
    x = torch.randn(2, 1, 32, 32, 32)
    torch.testing.assert_close(model.forward_features(x), model.fc_norm(model.forward_tokens(x).mean(1)))


def test_attention_backend_switch_reaches_every_block():
    torch.manual_seed(0)
    model = ViT3D(**TINY_VIT, attn_backend="math").eval()
    x = torch.randn(1, 1, 32, 32, 32)
    ref = model(x)
    model.attn_backend = "sdpa"
    assert all(b.attn.backend == "sdpa" for b in model.blocks)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_optimiser_helpers():
    model = ViT3D(**TINY_VIT)
    params = dict(model.named_parameters())
    assert model.no_weight_decay() == {"pos_embed", "cls_token"} and model.no_weight_decay() <= set(params)
    ids = {n: model.layer_id(n) for n in params}
    assert ids["patch_embed.proj.weight"] == ids["cls_token"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.1.mlp.fc2.bias"] == 2
    assert ids["norm.weight"] == model.num_layers + 1 == 3
    for name in ("resnet18", "densenet121"):
        cnn = create_backbone(name, img_size=32)
        ids = {cnn.layer_id(n) for n, _ in cnn.named_parameters()}
        assert min(ids) == 0 and max(ids) <= cnn.num_layers + 1 and set(range(1, 5)) <= ids
        assert cnn.no_weight_decay() == set()


def test_resnet_keeps_monai_key_names_for_medicalnet():
    # MedicalNet resnet18 as MONAI builds it for those weights: 1 channel, shortcut A, no classifier
    reference = resnet18(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="A")
    model = create_backbone("resnet18", img_size=32)
    model.load_state_dict({f"net.{k}": v for k, v in reference.state_dict().items()}, strict=True)
    assert model.net.conv1.stride == (2, 2, 2)  # MedicalNet's stem
    assert model.feature_dim == 512


def test_densenet_has_no_classifier():
    model = create_backbone("densenet121", img_size=32)
    assert model.feature_dim == 1024
    assert not any(n.startswith("net.class_layers.out") for n in model.state_dict())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(TINY_VIT, img_size=30), "not divisible by patch_size"),
        (dict(TINY_VIT, num_heads=5), "not divisible by num_heads"),
        (dict(TINY_VIT, class_token=False), "global_pool='avg'"),
        (dict(TINY_VIT, pos_embed="rope"), "pos_embed"),
        (dict(TINY_VIT, attn_backend="flash"), "attn_backend"),
        (dict(TINY_VIT, patch_size=(8, 8)), "patch_size"),
        (dict(TINY_VIT, drop_path_rate=1.0), "drop_path_rate"),
    ],
)
def test_vit_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViT3D(**kwargs)


def test_registry_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown backbone 'vit_huge'.*vit_base_p16"):
        create_backbone("vit_huge")
    with pytest.raises(ConfigError, match="'resnet18'.*'patch_size'"):
        create_backbone("resnet18", patch_size=8)
    with pytest.raises(ConfigError, match="'vit_tiny_p16'.*'widen_factor'"):
        create_backbone("vit_tiny_p16", widen_factor=2)


def test_wrong_input_shape_is_reported():
    with pytest.raises(ValueError, match=r"expects input \(B, 1, 32, 32, 32\)"):
        ViT3D(**TINY_VIT)(torch.randn(1, 1, 16, 32, 32))
    with pytest.raises(ValueError, match="expects input"):
        create_backbone("resnet18", img_size=32)(torch.randn(1, 2, 32, 32, 32))


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        (
            "resnet18",
            dict(norm="instance"),
            r"norm='instance' has no learnable scale.*norm=\[instance, \{affine: true\}\]",
        ),
        ("resnet18", dict(norm="bogus"), r"'resnet18': norm='bogus' is not a layer MONAI can build"),
        ("resnet18", dict(norm=["group", {"num_groups": 3}]), r"norm=.*divisible by num_groups"),
        ("resnet50", dict(act="bogus"), r"'resnet50': act='bogus' is not a layer MONAI can build"),
        ("resnet18", dict(shortcut_type="C"), r"shortcut_type must be 'A' .* or 'B'"),
        ("resnet18", dict(widen_factor="x"), r"widen_factor must be a number"),
        ("resnet18", dict(conv1_t_size=0), r"conv1_t_size must be a positive integer"),
        ("densenet121", dict(block_config=3), r"'densenet121': block_config must be a list of positive integers"),
        ("densenet121", dict(act=["prelu", {"bogus": 1}]), r"act=.*unexpected keyword argument 'bogus'"),
        ("densenet121", dict(norm="instance"), r"norm='instance' normalises over the voxels.*one voxel \(1, 1, 1\)"),
        ("vit_tiny_p16", dict(depth="2"), r"'vit_tiny_p16' cannot be built with \{'depth': '2'\}"),
    ],
)
def test_bad_backbone_arguments_are_one_config_error_naming_the_backbone_and_argument(name, kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        create_backbone(name, img_size=32, **kwargs)
    assert "\n" not in str(err.value)


def test_resnet_norm_and_act_reach_every_block():
    # MONAI 1.6 passes norm and act to the stem only; every block must get them. The kwargs come as a config
    # gives them (OmegaConf containers), which MONAI's factories refuse unless they arrive as a list and a dict.
    kwargs = OmegaConf.create({"norm": ["instance", {"affine": True}], "act": "gelu"})
    model = create_backbone("resnet18", img_size=(16, 16, 48), **kwargs).train()
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"InstanceNorm3d", "GELU"} <= kinds and not kinds & {"BatchNorm3d", "ReLU"}
    assert model.forward_features(torch.randn(2, 1, 16, 16, 48)).shape == (2, 512)  # layer4 keeps 2 voxels
    assert json.loads(json.dumps(model.arch))["kwargs"]["norm"] == ["instance", {"affine": True}]
    plain = create_backbone("resnet18", img_size=16)
    assert {type(m).__name__ for m in plain.modules()} >= {"BatchNorm3d", "ReLU"}
