"""synth/ldm/bundle.py: the public bundle's weight layout, loading and refusals."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from common.errors import CheckpointError
from synth.ldm.bundle import _network_kwargs, load_bundle
from synth.ldm.sampling import generate

BUNDLE = {
    "gender": 0.0,
    "age": 0.1,
    "ventricular_vol": 0.2,
    "brain_vol": 0.4,
    "load_old": 1,
    "conditioning": "$torch.tensor([[@gender, @age, @ventricular_vol, @brain_vol]]).to(@device).unsqueeze(1)",
    "autoencoder_def": {
        "_target_": "monai.networks.nets.AutoencoderKL",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "latent_channels": 3,
        "channels": [64, 128, 128, 128],
        "num_res_blocks": 2,
        "norm_num_groups": 32,
        "norm_eps": 1e-06,
        "attention_levels": [False, False, False, False],
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
    },
    "load_autoencoder_path": "$@model_dir + '/autoencoder.pt'",
    "diffusion_def": {
        "_target_": "monai.networks.nets.DiffusionModelUNet",
        "spatial_dims": 3,
        "in_channels": 7,
        "out_channels": 3,
        "channels": [256, 512, 768],
        "num_res_blocks": 2,
        "attention_levels": [False, True, True],
        "norm_num_groups": 32,
        "norm_eps": 1e-06,
        "resblock_updown": True,
        "num_head_channels": [0, 512, 768],
        "with_conditioning": True,
        "transformer_num_layers": 1,
        "cross_attention_dim": 4,
        "upcast_attention": True,
        "use_flash_attention": False,
    },
    "load_diffusion_path": "$@model_dir + '/model.pt'",
    "scheduler": {
        "_target_": "monai.networks.schedulers.DDIMScheduler",
        "_requires_": ["@load_diffusion", "@load_autoencoder"],
        "beta_start": 0.0015,
        "beta_end": 0.0205,
        "num_train_timesteps": 1000,
        "schedule": "scaled_linear_beta",
        "clip_sample": False,
    },
    "noise": "$torch.randn((1, 3, 20, 28, 20)).to(@device)",
    "set_timesteps": "$@scheduler.set_timesteps(num_inference_steps=50)",
}
# sha256 of the sorted "key (shape)" lines of the state dicts of MONAI Generative 0.2.3's AutoencoderKL and
# DiffusionModelUNet built at the bundle's config (the package the bundle's weights were trained with).
GENERATIVE_LAYOUT = {
    "autoencoder_def": "1c24d3d957fb08874825e718d92f14fb32a5206b86167ae47623af9c74ad1e6c",
    "diffusion_def": "f81f207bb581a0874793a7b839f9ffb2eade19ffa3ced1e26cff070166386427",
}
NETS = {"autoencoder_def": AutoencoderKL, "diffusion_def": DiffusionModelUNet}


def to_generative_layout(state: dict) -> dict:
    """MONAI 1.4+ key names -> MONAI Generative's (the inverse of ``load_old_state_dict``'s renames)."""
    out = {}
    for key, value in state.items():
        key = key.replace(".postconv.", ".conv.")
        key = re.sub(r"(transformer_blocks\.\d+\.attn\d)\.out_proj\.", r"\1.to_out.0.", key)
        key = re.sub(r"\.attn\.(to_[qkv])\.", r".\1.", key).replace(".attn.out_proj.", ".proj_attn.")
        out[key] = value
    return out


def _layout_hash(state: dict) -> str:
    return hashlib.sha256("\n".join(f"{k} {tuple(v.shape)}" for k, v in sorted(state.items())).encode()).hexdigest()


def _reduced(config: dict) -> dict:
    """The bundle's networks with fewer channels (same levels, blocks and attention: the same keys)."""
    small = copy.deepcopy(config)
    small["autoencoder_def"].update(channels=[8, 16, 16, 16], norm_num_groups=8)
    small["diffusion_def"].update(channels=[16, 32, 48], norm_num_groups=8, num_head_channels=[0, 32, 48])
    small["noise"] = "$torch.randn((1, 3, 4, 4, 4)).to(@device)"  # -> 32^3 volumes
    return small


@pytest.mark.parametrize("key", ["autoencoder_def", "diffusion_def"])
def test_bundle_networks_match_the_published_weight_layout(key):
    with torch.device("meta"):  # the full ~550M-parameter UNet, without memory
        full = NETS[key](**_network_kwargs(BUNDLE, key, Path("inference.json")))
        small = NETS[key](**_network_kwargs(_reduced(BUNDLE), key, Path("inference.json")))
    assert _layout_hash(to_generative_layout(full.state_dict())) == GENERATIVE_LAYOUT[key]
    assert set(small.state_dict()) == set(full.state_dict())  # the reduced test bundle has the same keys


def _write_bundle(folder: Path, config: dict, drop: str | None = None) -> dict[str, dict]:
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    states = {}
    for key, name in (("autoencoder_def", "autoencoder.pt"), ("diffusion_def", "model.pt")):
        net = NETS[key](**_network_kwargs(config, key, Path("inference.json")))
        state = {k: torch.randn_like(v) * 0.05 for k, v in to_generative_layout(net.state_dict()).items()}
        if drop and key == "diffusion_def":
            state.pop(drop)
        torch.save(state, folder / "models" / name)
        states[key] = state
    return states


def test_bundle_loads_random_weights_in_its_layout_and_samples(tmp_path):
    states = _write_bundle(tmp_path / "bundle", _reduced(BUNDLE))
    model = load_bundle(tmp_path / "bundle")
    assert model.extra["weight_layout"] == {"autoencoder": "old", "unet": "old"}
    assert model.unet.concat and model.unet.crossattn and model.default_ddim_steps == 50
    assert model.image_shape == (32, 32, 32) and model.spacing == (1.0, 1.0, 1.0) and model.scale_factor == 1.0
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.weight"  # renamed on load
    torch.testing.assert_close(
        model.unet.unet.state_dict()[key.replace("to_out.0", "out_proj")], states["diffusion_def"][key]
    )
    cond = torch.tensor([[1.0, 0.2, 0.3, 0.5], [1.0, 0.8, 0.3, 0.5]])
    images = generate(model, cond, seeds=[1, 1], ddim_steps=2)
    assert images.shape == (2, 1, 32, 32, 32)
    assert (images[0] - images[1]).abs().max() > 1e-5  # age changes the sample (a random decoder damps it)


def test_bundle_with_missing_weights_is_refused(tmp_path):
    _write_bundle(tmp_path / "bundle", _reduced(BUNDLE), drop="time_embed.0.weight")
    with pytest.raises(CheckpointError, match="model.pt"):
        load_bundle(tmp_path / "bundle")
