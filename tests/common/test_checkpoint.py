import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import common
from common.checkpoint import export_backbone, load_export, load_state_dict_strict, read_export_metadata
from common.errors import CheckpointError
from common.models import create_backbone, registry

META = {
    "input_size": [32, 16, 16],
    "spacing": [1.5, 1.5, 1.5],
    "intensity": "zscore",
    "corpus": "synth",
    "objective": "mae",
    "step": 7,
}


def tiny_vit():
    torch.manual_seed(0)
    return create_backbone("vit_tiny_p16", img_size=(32, 16, 16), patch_size=8, embed_dim=24, depth=1, num_heads=2)


class TiedNet(nn.Module):
    """Two layers sharing one weight: state_dict holds two keys on one storage."""

    def __init__(self, img_size=8, in_chans=1):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight
        self.register_buffer("running", torch.arange(3.0))


@pytest.fixture
def tied_registered(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "test_tied", (TiedNet, {}))


def test_export_roundtrip_rebuilds_identical_model(tmp_path):
    model = tiny_vit().eval()
    path = export_backbone(model, tmp_path / "enc.safetensors", META)

    loaded, meta = load_export(path)
    assert type(loaded) is type(model)
    assert loaded.arch == model.arch
    own, got = model.state_dict(), loaded.state_dict()
    assert own.keys() == got.keys()
    for k in own:
        torch.testing.assert_close(got[k], own[k], rtol=0, atol=0)
    x = torch.randn(2, 1, 32, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), model(x))
    assert meta["arch"] == model.arch
    assert {k: meta[k] for k in META} == META
    assert meta["package_version"] == common.__version__
    assert read_export_metadata(path) == meta


def test_export_takes_input_size_from_model_and_refuses_missing_keys(tmp_path):
    model = tiny_vit()
    meta = export_backbone(model, tmp_path / "a.safetensors", {"spacing": (1, 1, 1), "intensity": "none"})
    assert read_export_metadata(meta)["input_size"] == [32, 16, 16]
    with pytest.raises(CheckpointError, match="lacks spacing, intensity"):
        export_backbone(model, tmp_path / "b.safetensors", {"input_size": [32, 16, 16]})
    with pytest.raises(CheckpointError, match=r"input_size \[16, 16, 16\] differs from the model's img_size"):
        export_backbone(model, tmp_path / "d.safetensors", {**META, "input_size": [16, 16, 16]})
    with pytest.raises(CheckpointError, match="not JSON serialisable"):
        export_backbone(model, tmp_path / "c.safetensors", {**META, "corpus": object()})
    assert not (tmp_path / "b.safetensors").exists() and not (tmp_path / "c.safetensors").exists()


def test_export_refuses_model_without_arch_or_wrong_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="no `arch`"):
        export_backbone(nn.Linear(2, 2), tmp_path / "x.safetensors", META)
    with pytest.raises(CheckpointError, match=".safetensors"):
        export_backbone(tiny_vit(), tmp_path / "x.pt", META)


def test_tied_weights_export_and_load(tmp_path, tied_registered):
    model = create_backbone("test_tied", img_size=8)
    path = export_backbone(model, tmp_path / "tied.safetensors", META)
    assert set(load_file(path)) == {"enc.weight", "enc.bias", "dec.weight", "dec.bias", "running"}
    loaded, _ = load_export(path)
    torch.testing.assert_close(loaded.dec.weight, model.enc.weight)
    torch.testing.assert_close(loaded.running, torch.arange(3.0))


def test_strict_load_lists_missing_unexpected_and_mismatched(tmp_path):
    model = tiny_vit()
    path = export_backbone(model, tmp_path / "enc.safetensors", META)
    header = {"neurotransfer": json.dumps(read_export_metadata(path))}
    state = load_file(path)
    state.pop("norm.weight")
    state["extra.weight"] = torch.zeros(1)
    state["patch_embed.proj.bias"] = torch.zeros(5)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad, metadata=header)

    with pytest.raises(CheckpointError) as err:
        load_export(bad)
    msg = str(err.value)
    assert str(bad) in msg and "missing keys (1): norm.weight" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "patch_embed.proj.bias: file (5,) vs model (24,)" in msg

    fresh = tiny_vit()
    before = fresh.blocks[0].attn.qkv.weight.clone()
    with pytest.raises(CheckpointError):
        load_state_dict_strict(fresh, {k: v + 1 for k, v in state.items()}, "src")
    torch.testing.assert_close(fresh.blocks[0].attn.qkv.weight, before)  # nothing loaded when anything is off


def test_read_metadata_refuses_foreign_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="without neurotransfer metadata"):
        read_export_metadata(plain)
    text = tmp_path / "text.safetensors"
    text.write_text("not a tensor file")
    with pytest.raises(CheckpointError, match="text.safetensors: not a readable safetensors"):
        load_export(text)
    with pytest.raises(CheckpointError, match="no such export"):
        load_export(tmp_path / "absent.safetensors")


def test_non_finite_weights_are_refused_naming_the_file_and_every_tensor(tmp_path):
    model = tiny_vit()
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
        model.blocks[0].attn.qkv.bias[:3] = float("-inf")
    path = export_backbone(model, tmp_path / "diverged.safetensors", META)
    with pytest.raises(CheckpointError) as err:
        load_export(path)
    message = str(err.value)
    assert message.startswith(f"{path}: 2 tensor(s) hold non-finite values")
    assert "blocks.0.attn.qkv.bias (3 Inf of 72)" in message and "norm.weight (1 NaN of 24)" in message
    assert "\n" not in message
