"""Weight import from every source format, built with the real libraries (timm, transformers, MONAI,
DeepSpeed) and random weights; no downloads."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from common.checkpoint import export_backbone
from common.errors import CheckpointError
from common.models import create_backbone
from common.models.vit import ViT3D
from common.torchvision_ops import import_torchvision_without_ops
from common.weights import load_backbone
from common.weights.adapt import fold_input_channels, inflate_kernel, resample_kernel
from common.weights.fit import PATCH_KERNEL

import_torchvision_without_ops()  # timm and transformers import torchvision (common.torchvision_ops says why)


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------- pure adapters
def test_adapters_keep_the_response_to_constant_input():
    torch.manual_seed(0)
    w2d = torch.randn(4, 3, 5, 5)
    grey = torch.randn(1, 1, 5, 5)
    folded = fold_input_channels(w2d, 1)
    assert torch.allclose(F.conv2d(grey, folded), F.conv2d(grey.expand(1, 3, 5, 5), w2d), atol=1e-5)
    w3d = inflate_kernel(w2d, depth=3, axis=1)
    assert w3d.shape == (4, 3, 5, 3, 5)  # the new taps on H; the 2D axes on D and W
    plane = torch.randn(1, 3, 5, 1, 5).expand(1, 3, 5, 3, 5)
    assert torch.allclose(F.conv3d(plane, w3d), F.conv2d(plane[:, :, :, 0], w2d).unsqueeze(3), atol=1e-5)
    tubelet = torch.randn(4, 1, 2, 16, 16)
    resized = resample_kernel(tubelet, (8, 8, 8))
    const = torch.ones(1, 1, 8, 8, 8)
    assert torch.allclose(
        F.conv3d(const, resized, stride=8),
        F.conv3d(torch.ones(1, 1, 2, 16, 16), tubelet, stride=(2, 16, 16)),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_inflation_on_every_axis_gives_the_2d_response_to_a_volume_constant_along_it(axis):
    """A non-square 2D kernel (3 x 5): its two axes must fill the two other spatial axes in order."""
    torch.manual_seed(axis)
    w2d = torch.randn(4, 2, 3, 5)
    w3d = inflate_kernel(w2d, depth=4, axis=axis)
    shape = [3, 5]
    shape.insert(axis, 4)
    assert w3d.shape == (4, 2, *shape)
    image = torch.randn(1, 2, 7, 9)  # (B, C, a, b): a and b fill the non-inflated axes in order
    volume = image.unsqueeze(2 + axis).expand(-1, -1, *[7, 9][:axis], 4, *[7, 9][axis:])
    out = F.conv3d(volume, w3d)  # one output position along the inflated axis
    torch.testing.assert_close(out.squeeze(2 + axis), F.conv2d(image, w2d), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- timm 2D
@pytest.mark.parametrize("axis", [0, 1])
def test_timm_vit_inflation_reproduces_2d_features_on_a_constant_volume(timm, tmp_path, axis):
    """I3D property: a volume one patch deep, constant along the inflated axis, gives timm's 2D features of
    that slice repeated to RGB."""
    torch.manual_seed(0)
    vit2d = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=0).eval()
    nn.init.normal_(vit2d.pos_embed, std=0.5)  # timm's default is tiny; make position matter
    path = tmp_path / "vit2d.pth"
    torch.save(vit2d.state_dict(), path)

    size = [32, 32, 32]
    size[axis] = 16  # one patch deep along the inflated axis
    model = ViT3D(
        img_size=tuple(size),
        patch_size=16,
        embed_dim=192,
        depth=2,
        num_heads=3,
        pos_embed="learn",
        attn_backend="math",
    ).eval()
    report = load_backbone(model, f"timm2d:{path}", axis=axis)
    assert "patch_embed.proj.weight" in report.inflated
    assert not report.missing and report.unexpected == []

    image = torch.randn(2, 1, 32, 32)
    volume = image.unsqueeze(2 + axis).expand(2, 1, *size)  # constant along the inflated axis
    with torch.no_grad():
        tokens2d = vit2d.forward_features(image.expand(2, 3, 32, 32))  # (B, 1 + 4, 192)
        tokens3d = model.forward_tokens(volume)
        pooled2d = vit2d.forward_head(tokens2d, pre_logits=True)
        pooled3d = model.forward_features(volume)
    assert torch.allclose(tokens3d, tokens2d, atol=1e-4)
    assert torch.allclose(pooled3d, pooled2d, atol=1e-4)


def test_timm_vit_position_embedding_is_resampled_to_the_3d_grid(timm, tmp_path):
    vit2d = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=0)
    path = tmp_path / "vit2d.safetensors"
    save_file({k: v.contiguous() for k, v in vit2d.state_dict().items()}, path)
    model = ViT3D(img_size=(32, 64, 48), patch_size=16, embed_dim=192, depth=1, num_heads=3, pos_embed="learn")
    report = load_backbone(model, f"timm2d:{path}")
    assert "pos_embed" in report.resized and model.pos_embed.shape == (1, 1 + 2 * 4 * 3, 192)
    grid = model.pos_embed[0, 1:].reshape(2, 4, 3, 192)
    assert torch.equal(grid[0], grid[1])  # repeated along the inflated axis D
    assert torch.equal(model.pos_embed[0, 0], vit2d.pos_embed[0, 0])  # the cls row is kept


def test_timm_resnet_inflates_into_monai_resnet(timm, tmp_path):
    torch.manual_seed(0)
    resnet2d = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": resnet2d.state_dict()}, path)
    model = create_backbone("resnet18", img_size=32, shortcut_type="B", bias_downsample=False).eval()
    report = load_backbone(model, f"timm2d:{path}")
    assert report.unexpected == ["net.fc.bias", "net.fc.weight"]  # the ImageNet classifier
    assert not report.missing
    assert len(report.inflated) == 20  # every conv: stem, 16 block convs, 3 downsample convs
    state = model.state_dict()
    assert torch.equal(state["net.layer1.0.bn1.running_var"], resnet2d.state_dict()["layer1.0.bn1.running_var"])
    image = torch.randn(1, 1, 32, 32)
    volume = image.unsqueeze(2).expand(1, 1, 16, 32, 32)
    with torch.no_grad():
        out2d = resnet2d.conv1(image.expand(1, 3, 32, 32))  # (1, 64, 16, 16)
        out3d = model.net.conv1(volume)  # (1, 64, 8, 16, 16); slices away from the zero padding match
    assert torch.allclose(out3d[:, :, 2:6], out2d.unsqueeze(2).expand(-1, -1, 4, -1, -1), atol=1e-4)


# ---------------------------------------------------------------------------------------------- VideoMAE
def _tiny_videomae(transformers):
    cfg = transformers.VideoMAEConfig(
        image_size=32,
        patch_size=16,
        num_channels=3,
        num_frames=4,
        tubelet_size=2,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=192,
        use_mean_pooling=True,
    )
    torch.manual_seed(0)
    model = transformers.VideoMAEModel(cfg).eval()
    with torch.no_grad():  # random non-zero biases, so the q/v bias mapping is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model


def _vit_for_videomae(patch=(2, 16, 16)) -> ViT3D:
    return ViT3D(
        img_size=(4, 32, 32),
        patch_size=patch,
        embed_dim=48,
        depth=2,
        num_heads=3,
        class_token=False,
        global_pool="avg",
        attn_backend="math",
    ).eval()


def test_videomae_transformers_format_matches_the_hf_model(transformers, tmp_path):
    hf = _tiny_videomae(transformers)
    hf.save_pretrained(tmp_path / "hf")
    model = _vit_for_videomae()
    report = load_backbone(model, f"videomae:{tmp_path / 'hf'}")
    assert report.missing == ["fc_norm.bias", "fc_norm.weight", "pos_embed"]  # VideoMAE has no learned ones
    assert "patch_embed.proj.weight" in report.resized  # 3 channels folded to 1
    with torch.no_grad():
        model.pos_embed.copy_(hf.embeddings.position_embeddings)  # the sin-cos table HF builds on the fly
        grey = torch.randn(1, 4, 1, 32, 32)  # (B, T, C, H, W) as HF takes it
        expected = hf(pixel_values=grey.expand(1, 4, 3, 32, 32)).last_hidden_state
        got = model.forward_tokens(grey.permute(0, 2, 1, 3, 4))  # (B, 1, T=D, H, W)
    assert torch.allclose(got, expected, atol=1e-4)


def test_videomae_original_format_and_tubelet_resampling(transformers, tmp_path):
    hf = _tiny_videomae(transformers)
    hf.save_pretrained(tmp_path / "hf")
    reference = _vit_for_videomae()
    load_backbone(reference, f"videomae:{tmp_path / 'hf'}")

    # the original repository's pre-training checkpoint: {"model": {"encoder.blocks.0.attn.q_bias": ...}}
    original = {}
    for key, value in reference.state_dict().items():
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            original[f"encoder.{key[: -len('qkv.bias')]}q_bias"] = q
            original[f"encoder.{key[: -len('qkv.bias')]}v_bias"] = v
        elif key != "pos_embed" and not key.startswith("fc_norm"):
            original[f"encoder.{key}"] = value
    original["encoder.patch_embed.proj.weight"] = hf.state_dict()["embeddings.patch_embeddings.projection.weight"]
    original["decoder.head.weight"] = torch.zeros(3, 48)
    original["mask_token"] = torch.zeros(1, 1, 48)
    torch.save({"model": original}, tmp_path / "videomae_pretrain.pth")

    model = _vit_for_videomae()
    report = load_backbone(model, f"videomae:{tmp_path / 'videomae_pretrain.pth'}")
    for key, value in reference.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(model.state_dict()[key], value), key

    cube = ViT3D(
        img_size=(16, 32, 32),
        patch_size=16,
        embed_dim=48,
        depth=2,
        num_heads=3,
        class_token=False,
        global_pool="avg",
    )
    report = load_backbone(cube, f"videomae:{tmp_path / 'videomae_pretrain.pth'}")
    assert report.resized["patch_embed.proj.weight"] == "(48, 3, 2, 16, 16) -> (48, 1, 16, 16, 16)"


# ---------------------------------------------------------------------------------------------- MedicalNet
def test_medicalnet_checkpoint_loads_into_the_monai_resnet(tmp_path):
    torch.manual_seed(0)
    source = create_backbone("resnet18", img_size=32)
    state = {f"module.{k[len('net.') :]}": v for k, v in source.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(2, 512, 1, 1, 1)  # MedicalNet's segmentation head
    torch.save({"state_dict": state}, tmp_path / "resnet_18_23dataset.pth")
    model = create_backbone("resnet18", img_size=32)
    report = load_backbone(model, f"medicalnet:{tmp_path / 'resnet_18_23dataset.pth'}")
    assert report.unexpected == ["net.conv_seg.0.weight"] and not report.missing
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


# ---------------------------------------------------------------------------------------------- our own
def test_export_loads_exactly_and_resamples_position_embedding_only_when_asked(tmp_path):
    source = create_backbone("vit_tiny_p16", img_size=32, patch_size=8, depth=1, pos_embed="learn")
    path = export_backbone(source, tmp_path / "encoder.safetensors", {"spacing": [2, 2, 2], "intensity": "zscore"})
    same = create_backbone("vit_tiny_p16", img_size=32, patch_size=8, depth=1, pos_embed="learn")
    report = load_backbone(same, str(path))
    assert not report.missing and not report.resized and not report.unexpected
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), source.state_dict().values()))
    larger = create_backbone("vit_tiny_p16", img_size=48, patch_size=8, depth=1, pos_embed="learn")
    before = {k: v.clone() for k, v in larger.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"would resize 1 \(pos_embed grid .* --allow-partial") as err:
        load_backbone(larger, str(path))
    assert "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in larger.state_dict().items())  # refused: nothing loaded
    report = load_backbone(larger, str(path), allow_partial=True)
    assert "pos_embed" in report.resized and larger.pos_embed.shape == (1, 1 + 6**3, 192)


def test_our_own_weights_that_leave_tensors_as_initialised_are_refused_unless_asked(tmp_path):
    """Twelve blocks built for a one-block export: the load would leave eleven blocks random."""
    source = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1)
    path = export_backbone(source, tmp_path / "e.safetensors", {"spacing": [2, 2, 2], "intensity": "zscore"})
    deeper = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=12)
    with pytest.raises(CheckpointError, match=r"would leave 132 tensor\(s\) as initialised \(blocks\.1\."):
        load_backbone(deeper, str(path))
    report = load_backbone(deeper, str(path), allow_partial=True)
    assert len(report.missing) == 132 and not report.resized


def test_foreign_weights_are_adapted_without_asking(tmp_path):
    """A VideoMAE checkpoint has no position table (a fixed sin-cos one) and a 2×8×8 tubelet: adapted by design."""
    source = create_backbone("vit_tiny_p16", img_size=16, patch_size=[2, 8, 8], depth=1)
    state = {k: v for k, v in source.state_dict().items() if k != "pos_embed"}
    torch.save(state, tmp_path / "v.pth")
    model = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1)
    report = load_backbone(model, f"videomae:{tmp_path / 'v.pth'}")
    assert report.missing == ["pos_embed"] and PATCH_KERNEL in report.resized


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deepspeed_checkpoints_zero0_and_zero2(tmp_path, monkeypatch):
    deepspeed = pytest.importorskip("deepspeed")
    # a world of one (an earlier test may have made it already; DeepSpeed reads the environment either way)
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    if not torch.distributed.is_initialized():  # the conftest destroys it when the session ends
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    for stage in (0, 2):
        wrapper = nn.Module()  # what pretrain's objectives look like: encoder + decoder
        wrapper.encoder = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1)
        wrapper.decoder = nn.Linear(4, 4)
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "steps_per_print": 10**9,
        }
        params = [p for p in wrapper.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=wrapper, model_parameters=params, config=config)
        engine.save_checkpoint(str(tmp_path / f"zero{stage}"), tag="step1")
        model = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1)
        report = load_backbone(model, f"deepspeed:{tmp_path / f'zero{stage}'}")
        assert not report.missing
        for key, value in wrapper.encoder.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (stage, key)


# ---------------------------------------------------------------------------------------------- bad input
def test_scratch_loads_nothing_and_says_so():
    model = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1)
    report = load_backbone(model, "scratch")
    assert report.loaded == [] and report.source is None


def test_wrong_kind_of_init_is_a_clear_error(tmp_path, timm):
    vit = create_backbone("vit_tiny_p16", img_size=32, patch_size=16, depth=1)
    resnet = create_backbone("resnet18", img_size=32)
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r2d.pth")
    with pytest.raises(CheckpointError, match="not a 3D tubelet kernel|not a VideoMAE"):
        load_backbone(vit, f"videomae:{tmp_path / 'r2d.pth'}")
    with pytest.raises(CheckpointError, match="conv1.weight is 2D"):
        load_backbone(resnet, f"medicalnet:{tmp_path / 'r2d.pth'}")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_backbone(vit, f"timm2d:{tmp_path}")
    with pytest.raises(CheckpointError, match="unknown weight source 'imagenet'"):
        load_backbone(vit, "imagenet:/x.pth")
    with pytest.raises(CheckpointError, match="not a DeepSpeed|needs a DeepSpeed checkpoint folder"):
        load_backbone(vit, f"deepspeed:{tmp_path / 'r2d.pth'}")
    save_file({"something.else": torch.zeros(3)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="without neurotransfer metadata"):
        load_backbone(vit, str(tmp_path / "foreign.safetensors"))


def test_weights_that_do_not_fit_are_refused_and_the_model_is_untouched(tmp_path):
    source = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1)
    path = export_backbone(source, tmp_path / "e.safetensors", {"spacing": [2, 2, 2], "intensity": "zscore"})
    wider = create_backbone("vit_small_p16", img_size=16, patch_size=8, depth=1)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load_backbone(wider, str(path))
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())


# ---------------------------------------------------------------------------------------- hostile checkpoints
class RunsCode:
    """Unpickles into a shell command that writes ``marker``: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_deepspeed_folder(folder, marker, zero_shards: bool):
    """A DeepSpeed checkpoint folder (``latest`` + tag) whose states file runs code when unpickled in full."""
    tag = folder / "step1"
    tag.mkdir(parents=True)
    (folder / "latest").write_text("step1")
    module = {"encoder.pos_embed": torch.zeros(1, 3, 4)}
    if zero_shards:  # ZeRO 1-3: the optimizer shard is what DeepSpeed's consolidation unpickles first
        benign = {"module": module, "buffer_names": [], "param_shapes": [{}], "shared_params": {}, "ds_version": "0"}
        torch.save({**benign, "frozen_param_shapes": None}, tag / "mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": RunsCode(marker)}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        return tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"module": module, "hook": RunsCode(marker)}, tag / "mp_rank_00_model_states.pt")
    return tag / "mp_rank_00_model_states.pt"


@pytest.mark.parametrize("zero_shards", [False, True], ids=["zero0", "zero-shards"])
def test_a_deepspeed_checkpoint_that_needs_code_is_refused_before_it_runs(tmp_path, zero_shards):
    marker = tmp_path / "code-ran"
    bad = hostile_deepspeed_folder(tmp_path / "checkpoints", marker, zero_shards)
    model = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1)
    with pytest.raises(CheckpointError, match=f"{bad}: this file needs full pickle.*posix.system"):
        load_backbone(model, f"deepspeed:{tmp_path / 'checkpoints'}")
    assert not marker.exists()


def test_deepspeed_latest_may_not_point_outside_its_folder(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("../elsewhere")
    model = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1)
    with pytest.raises(CheckpointError, match="not a tag folder inside"):
        load_backbone(model, f"deepspeed:{tmp_path / 'checkpoints'}")


# ---------------------------------------------------------------------------------------- non-finite weights
def _poison(state: dict, key: str) -> dict:
    state = {k: v.clone() for k, v in state.items()}
    state[key].view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
    return state


def _tiny_vit(**kwargs):
    return create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1, **kwargs)


def _source_with_nan(kind: str, tmp: Path) -> tuple[nn.Module, str, Path]:
    """(model, init spec, the file the error must name) for a source of ``kind`` with a NaN and an Inf in the
    tensor the model calls ``net.conv1.weight`` (ResNet sources) or ``blocks.0.mlp.fc1.weight`` (ViT sources)."""
    if kind in ("medicalnet", "timm2d"):  # a ResNet as MedicalNet (3D) or timm (2D, inflated on import) writes it
        state = {k[len("net.") :]: v for k, v in create_backbone("resnet18", img_size=16).state_dict().items()}
        if kind == "timm2d":
            state = {k: v[..., 0] if v.ndim == 5 else v for k, v in state.items()}
        torch.save({"state_dict": _poison(state, "conv1.weight")}, tmp / "r.pth")
        return create_backbone("resnet18", img_size=16), f"{kind}:{tmp / 'r.pth'}", tmp / "r.pth"
    if kind == "monai":
        from monai.networks.nets import ViT

        vit = ViT(1, 16, 8, hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4, classification=False)
        torch.save(_poison(vit.state_dict(), "blocks.0.mlp.linear1.weight"), tmp / "m.pt")
        layout = dict(class_token=False, global_pool="avg", fc_norm=False, pos_embed="learn", norm_eps=1e-5)
        model = _tiny_vit(embed_dim=48, num_heads=4, mlp_ratio=2.0, **layout)
        return model, f"monai:{tmp / 'm.pt'}", tmp / "m.pt"
    state = _poison(_tiny_vit().state_dict(), "blocks.0.mlp.fc1.weight")
    if kind in ("export", "folder"):  # export_backbone writes what the model holds
        source = _tiny_vit()
        source.load_state_dict(state)
        path = export_backbone(source, tmp / "exp" / "model.safetensors", {"spacing": [2] * 3, "intensity": "zscore"})
        return _tiny_vit(), str(path if kind == "export" else path.parent), path
    if kind == "videomae":  # the original repository's layout is ViT3D's
        torch.save(state, tmp / "v.pth")
        return _tiny_vit(), f"videomae:{tmp / 'v.pth'}", tmp / "v.pth"
    (tmp / "ckpt" / "step1").mkdir(parents=True)  # deepspeed, ZeRO 0: module states under the objective's prefix
    (tmp / "ckpt" / "latest").write_text("step1")
    torch.save({"module": {f"encoder.{k}": v for k, v in state.items()}}, tmp / "ckpt/step1/mp_rank_00_model_states.pt")
    return _tiny_vit(), f"deepspeed:{tmp / 'ckpt'}", tmp / "ckpt"


@pytest.mark.parametrize("kind", ["export", "folder", "medicalnet", "timm2d", "videomae", "monai", "deepspeed"])
def test_non_finite_weights_are_refused_naming_the_file_and_the_tensor(tmp_path, kind):
    model, spec, file = _source_with_nan(kind, tmp_path)
    key = "net.conv1.weight" if kind in ("medicalnet", "timm2d") else "blocks.0.mlp.fc1.weight"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="non-finite") as err:
        load_backbone(model, spec)
    message = str(err.value)
    assert message.startswith(f"{file}: 1 tensor(s)") and f"{key} (1 NaN, 1 Inf of " in message
    assert "\n" not in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded
