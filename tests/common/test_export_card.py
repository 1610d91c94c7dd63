"""The export folder describes itself: config.json rebuilds the exact model, the card's front matter and its load
snippets (run here as a reader would run them), no absolute paths, files with the user's umask, old exports."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import yaml
from safetensors.torch import save_file

from common.checkpoint import METADATA_KEY, load_export
from common.export import export_folder, folder_config
from common.models import create_backbone
from common.weights import load_backbone

META = {
    "spacing": [2.0, 2.0, 2.0],
    "intensity": "zscore",
    "crop_foreground": True,
    "corpus": "medical",
    "objective": "mae",
    "step": 3,
    "training_data": {"medical": {"images": 16, "subjects": 12, "sites": 2, "age_range": [55.1, 84.0]}},
    "license": "other",
}
VIT = {"img_size": [16, 16, 32], "patch_size": 8, "depth": 2}


def _export(tmp_path, **kwargs):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_p16", **{**VIT, **kwargs}).eval()
    with torch.no_grad():
        for p in model.parameters():  # away from the initialisation: zero biases and unit norms would hide a bug
            p.add_(0.05 * torch.randn_like(p))
    return model, export_folder(model, tmp_path / "export", META)


def _snippet(card: str, heading: str) -> str:
    """The first ```python block after ``heading`` in the card."""
    after = card[card.index(heading) :]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_config_json_records_every_constructor_argument_and_rebuilds_the_model(tmp_path):
    model, folder = _export(tmp_path)
    arch = json.loads((folder / "config.json").read_text())["arch"]
    kwargs = arch["kwargs"]
    # the registry's defaults too: width, heads, MLP ratio, LayerNorm eps, pooling ...
    assert kwargs["embed_dim"] == 192 and kwargs["num_heads"] == 3 and kwargs["mlp_ratio"] == 4.0
    assert kwargs["norm_eps"] == 1e-6 and kwargs["global_pool"] == "token" and kwargs["qkv_bias"] is True
    rebuilt = create_backbone(arch["name"], **kwargs).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 1, 16, 16, 32)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_the_cards_plain_torch_snippet_loads_the_export(tmp_path, monkeypatch):
    model, folder = _export(tmp_path)
    monkeypatch.chdir(tmp_path)  # the card's paths are relative to the folder's parent
    namespace: dict = {}
    exec(_snippet((folder / "README.md").read_text(), "### plain torch + safetensors"), namespace)
    x = torch.randn(2, 1, 16, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"].forward_features(x), model.forward_features(x))
    assert namespace["features"].shape == (1, 192)


@pytest.mark.parametrize(
    "layout",
    [
        {},
        {"class_token": False, "global_pool": "avg"},
        {"global_pool": "avg"},
        {"pos_embed": "learn", "qkv_bias": False},
    ],
    ids=["cls-token", "avg-no-cls", "avg-fc-norm", "learned-pos-no-qkv-bias"],
)
def test_the_cards_monai_snippet_gives_the_exports_features(tmp_path, monkeypatch, layout):
    model, folder = _export(tmp_path, **layout)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(_snippet((folder / "README.md").read_text(), "### MONAI"), namespace)
    from monai.networks.nets import ViT

    assert isinstance(namespace["vit"], ViT)
    x = torch.randn(2, 1, 16, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(namespace["features"](x), model.forward_features(x), atol=1e-4, rtol=0)


def test_the_card_has_front_matter_and_says_what_it_is_not_for(tmp_path):
    _, folder = _export(tmp_path)
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "other" and front["library_name"] == "neurotransfer"
    assert {"medical-imaging", "vit_tiny_p16", "mae"} <= set(front["tags"])
    assert front["training_data"]["medical"] == {"images": 16, "subjects": 12, "sites": 2, "age_range": [55.1, 84.0]}
    assert "## Intended use and limits" in card and "not for clinical use" in card
    assert "- `medical`: " in card and "images 16" in card and "age range 55.1-84.0" in card


def test_nothing_in_the_folder_names_an_absolute_path(tmp_path):
    _, folder = _export(tmp_path)
    for name in ("README.md", "config.json"):
        text = (folder / name).read_text()
        assert str(tmp_path) not in text and not re.search(r"""["'(`\s]/\w""", text), name


def test_the_files_are_written_with_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        _, folder = _export(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == {"model.safetensors": 0o640, "config.json": 0o640, "README.md": 0o640}


def test_an_export_written_before_the_full_record_still_loads(tmp_path):
    """An old header: the user's kwargs only (no defaults), no crop_foreground, an orientation key."""
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1)
    meta = {
        "arch": {"name": "vit_tiny_p16", "kwargs": {"img_size": 16, "in_chans": 1, "patch_size": 8, "depth": 1}},
        "input_size": [16, 16, 16],
        "spacing": [2.0, 2.0, 2.0],
        "intensity": "zscore",
        "orientation": "RAS",
        "package_version": "0.0.9",
    }
    (tmp_path / "old").mkdir()
    save_file(model.state_dict(), tmp_path / "old" / "model.safetensors", metadata={METADATA_KEY: json.dumps(meta)})
    rebuilt, _ = load_export(tmp_path / "old")
    assert rebuilt.arch["kwargs"]["embed_dim"] == 192  # the registry's defaults fill what the export left out
    assert not load_backbone(
        create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1), str(tmp_path / "old")
    ).missing
    config = folder_config(meta)
    assert config["preprocessing"]["crop_foreground"] is None and "orientation" not in config
