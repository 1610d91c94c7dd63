"""The latent-diffusion backend: train a tiny LDM on 2 mm volumes, sample corpora, load the bundle layout."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from common.data import read_manifest, write_nifti
from common.errors import CheckpointError, ConfigError, DataError
from synth.dataset import GeneratedDirectory
from synth.ldm.bundle import _network_kwargs, load_bundle
from synth.ldm.cli import main
from synth.ldm.config import AutoencoderTraining, LDMDataConfig, LDMTrainConfig
from synth.ldm.covariates import LabelScheme, covariate_table, label_volumes
from synth.ldm.model import load_model
from synth.ldm.run_state import load_state
from synth.ldm.sampling import generate, sample_to_directory
from synth.ldm.train import train_ldm
from synth.ldm.training_data import BadSampleGuard, ConditionedVolumes, collate_skipping_bad

SCHEME = LabelScheme(ventricles=(4, 5), non_brain=(0, 1))
TINY = [
    "data.spacing=[2.0,2.0,2.0]",
    "data.shape=[16,16,16]",
    "data.num_workers=0",
    "autoencoder.channels=[8,16]",
    "autoencoder.attention_levels=[false,false]",
    "autoencoder.norm_num_groups=4",
    "unet.channels=[16,32]",
    "unet.attention_levels=[false,true]",
    "unet.num_head_channels=[0,16]",
    "unet.norm_num_groups=8",
    "train_autoencoder.batch_size=2",
    "train_diffusion.batch_size=2",
    "train_diffusion.lr=1e-3",
    "train_autoencoder.log_every=1",
    "train_diffusion.log_every=1",
    "train_autoencoder.checkpoint_every=1",
    "train_diffusion.checkpoint_every=1",
    "train_diffusion.image_every=2",
    "train_diffusion.image_ddim_steps=2",
    "precision=fp32",
    "device=cpu",
]


def _brain(age: float, size: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """A ball brain (GM shell, WM core) whose central ventricle grows with age: (image, labels) at 2 mm."""
    z, y, x = np.mgrid[:size, :size, :size] - (size - 1) / 2
    r = np.sqrt(x**2 + y**2 + z**2)
    labels = np.zeros(r.shape, np.uint8)
    labels[r < 8.5] = 2
    labels[r < 6] = 3
    labels[r < 1.5 + 2.5 * (age - 20) / 60] = 4
    image = np.select([labels == 4, labels == 2, labels == 3], [0.2, 0.5, 0.8], 0.0).astype(np.float32)
    return image, labels


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # these networks are tiny: one thread is faster, and avoids spin-waiting on a shared, busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ldm_data")
    rows = []
    for i, age in enumerate(np.linspace(20, 80, 6)):
        image, labels = _brain(age)
        write_nifti(image, root / f"img{i}.nii.gz", spacing=(2, 2, 2))
        write_nifti(labels, root / f"lab{i}.nii.gz", spacing=(2, 2, 2), dtype=np.uint8)
        rows.append(
            {
                "path": f"img{i}.nii.gz",
                "subject_id": f"s{i}",
                "session_id": "ses-1",
                "site": "a",
                "dataset": "toy",
                "age": age,
                "sex": "FM"[i % 2],
                "diagnosis": "CN",
                "label_path": f"lab{i}.nii.gz",
            }
        )
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> Path:
    """A tiny LDM trained 2 + 2 steps, then resumed to 3 + 3."""
    out = tmp_path_factory.mktemp("ldm_run") / "run"
    steps = ["train_autoencoder.steps=2", "train_diffusion.steps=2"]
    assert main(["ldm-train", "--manifest", str(corpus), "--out", str(out), *TINY, *steps]) == 0
    more = ["train_autoencoder.steps=3", "train_diffusion.steps=3"]
    assert main(["ldm-train", "--out", str(out), "--resume", *more]) == 0
    return out


# ------------------------------------------------------------------------------------------------ covariates
def test_label_volumes_measure_millilitres(tmp_path):
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:2, :2, :2] = 4  # 8 ventricle voxels
    labels[5:, :, :] = 3  # 500 white-matter voxels
    labels[0, 9, 9] = 1  # CSF: not brain
    write_nifti(labels, tmp_path / "lab.nii.gz", spacing=(2, 2, 2), dtype=np.uint8)
    vent, brain = label_volumes(tmp_path / "lab.nii.gz", SCHEME)
    assert vent == pytest.approx(8 * 8 / 1000)
    assert brain == pytest.approx(500 * 8 / 1000)


def test_covariates_read_from_label_maps_and_missing_volumes_are_named(corpus, tmp_path):
    df = read_manifest(corpus)
    table = covariate_table(df, corpus, SCHEME)
    assert list(table["sex"]) == [0, 1, 0, 1, 0, 1]
    assert table["ventricle_volume"].is_monotonic_increasing  # the toy ventricle grows with age
    no_volumes = df.drop(columns=["label_path"])
    with pytest.raises(DataError, match="ventricle_volume"):
        covariate_table(no_volumes, tmp_path / "m.csv", SCHEME)
    given = no_volumes.assign(ventricle_ml=1.0, brain_ml=1000.0)  # the anatomy-model generator's columns
    assert covariate_table(given, tmp_path / "m.csv", SCHEME)["brain_volume"].eq(1000.0).all()


def test_config_rejects_a_shape_the_networks_cannot_halve():
    with pytest.raises(ConfigError, match="data.shape"):
        LDMTrainConfig(data=LDMDataConfig(shape=[20, 16, 16]))


def test_a_zero_head_width_where_attention_runs_is_a_config_error(corpus, tmp_path, capsys):
    # the UNet's middle block attends with the last level's head width, whatever attention_levels says
    heads = ["unet.attention_levels=[false,false]", "unet.num_head_channels=[0,0]"]
    assert main(["ldm-train", "--manifest", str(corpus), "--out", str(tmp_path / "o"), *TINY, *heads]) == 2
    assert "unet.num_head_channels[1]=0 must be > 0" in capsys.readouterr().err


def test_bad_files_are_skipped_then_stop_the_run(corpus, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    df = read_manifest(corpus)
    ds = ConditionedVolumes(
        [df["path"][0], str(broken)], np.zeros((2, 4)), LDMDataConfig(shape=[16, 16, 16]).preprocess()
    )
    batch = collate_skipping_bad([ds[0], ds[1]])
    assert batch["image"].shape == (1, 1, 16, 16, 16) and len(batch["bad"]) == 1
    BadSampleGuard(limit=0.5, dataset_size=2, manifest="m.csv").update(batch)  # 1 of 2 is allowed
    with pytest.raises(DataError, match="max_bad_fraction"):
        BadSampleGuard(limit=0.1, dataset_size=2, manifest="m.csv").update(batch)


# ------------------------------------------------------------------------------------------------ training
def test_training_writes_run_folder_and_resumes(run):
    assert (run / "config.yaml").is_file() and (run / "export" / "ldm.json").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for stage in ("autoencoder", "diffusion"):
        # resumed at step 2: steps 1, 2, 3 each logged once, never restarted from 0
        assert [r["step"] for r in records if r["stage"] == stage] == [1, 2, 3]
        assert load_state(run / "checkpoints" / f"{stage}.pt")["step"] == 3
    model = load_model(run)
    assert model.image_shape == (16, 16, 16) and model.spacing == (2.0, 2.0, 2.0)
    assert model.latent_shape == (3, 8, 8, 8) and model.scale_factor > 0
    assert model.covariates.low[1] == pytest.approx(20) and model.covariates.high[1] == pytest.approx(80)


def test_ldm_commands_refuse_an_out_that_is_a_file(run, corpus, tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert main(["ldm-train", "--manifest", str(corpus), "--out", str(target), *TINY]) == 2
    assert f"{target}: --out is a file" in capsys.readouterr().err
    assert main(["ldm-sample", "--model", str(run), "--n", "1", "--out", str(target), "--device", "cpu"]) == 2
    assert f"{target}: --out is a file" in capsys.readouterr().err and target.read_text() == "keep me"


def test_training_refuses_to_overwrite_a_run_without_resume(run, corpus):
    cfg = LDMTrainConfig(data=LDMDataConfig(manifest=str(corpus)))
    with pytest.raises(ConfigError, match="--resume"):
        train_ldm(cfg, run)


def test_patchgan_term_trains_and_a_too_deep_discriminator_is_refused(corpus, tmp_path):
    adv = ["train_autoencoder.steps=2", "train_diffusion.steps=0", "train_autoencoder.adv_weight=0.1"]
    out = tmp_path / "adv"
    assert (
        main(
            ["ldm-train", "--manifest", str(corpus), "--out", str(out), *TINY, *adv, "train_autoencoder.disc_layers=2"]
        )
        == 0
    )
    assert "d_loss" in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "disc" in load_state(out / "checkpoints" / "autoencoder.pt")  # resumable with its discriminator
    with pytest.raises(ConfigError, match="disc_layers"):  # 16^3 is too small for 3 strided layers
        LDMTrainConfig(data=LDMDataConfig(shape=[16, 16, 16]), train_autoencoder=AutoencoderTraining(adv_weight=0.1))


# ------------------------------------------------------------------------------------------------ sampling
def test_conditioning_changes_the_sample_and_seed_fixes_it(run):
    model = load_model(run)
    young_old = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.5, 0.5]])
    a = generate(model, young_old, seeds=[7, 7], ddim_steps=3)  # same noise, different age
    assert a.shape == (2, 1, 16, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert (a[0] - a[1]).abs().max() > 1e-4
    b = generate(model, young_old[1:], seeds=[7], ddim_steps=3)
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=1e-4)  # deterministic per seed, batch-independent


def test_sample_cli_writes_a_corpus_and_resumes(run, tmp_path, capsys):
    out = tmp_path / "corpus"
    args = [
        "ldm-sample",
        "--model",
        str(run),
        "--out",
        str(out),
        "--age",
        "50",
        "--sex",
        "F",
        "--ddim-steps",
        "2",
        "--seed",
        "3",
        "--no-progress",
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]
    assert main([*args, "--n", "2", "--ddim-steps", "0"]) == 2  # not silently the default 50
    assert "--ddim-steps must be >= 1" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--n", "2"]) == 0
    first = out / "images" / "sub-000000.nii.gz"
    stamp = first.stat().st_mtime_ns
    assert main([*args, "--n", "3", "--batch-size", "2"]) == 0  # grows the corpus, keeps what exists
    assert first.stat().st_mtime_ns == stamp
    df = read_manifest(out / "manifest.csv")  # the project's manifest: paths resolve, columns present
    assert len(df) == 3 and set(df["sex"]) == {"F"} and np.allclose(df["age"], 50)
    assert {"seed", "index", "ventricle_volume", "brain_volume", "cond_age"} <= set(df.columns)
    assert df["ventricle_volume"].nunique() > 1  # not fixed: drawn from the training subjects
    assert GeneratedDirectory(out)[2].shape == (1, 16, 16, 16)  # read as the anatomy-model corpora are
    img = nib.load(first)
    assert img.shape == (16, 16, 16) and np.allclose(img.header.get_zooms(), 2.0)
    # same settings, other folder: identical volumes (deterministic per seed)
    again = tmp_path / "again"
    sample_to_directory(
        load_model(run), again, n=1, seed=3, fixed={"age": 50, "sex": 0}, ddim_steps=2, show_progress=False
    )
    np.testing.assert_allclose(nib.load(again / "images" / "sub-000000.nii.gz").get_fdata(), img.get_fdata(), atol=1e-5)
    with pytest.raises(ConfigError, match="other settings"):
        sample_to_directory(load_model(run), out, n=3, seed=4, ddim_steps=2, show_progress=False)


# ------------------------------------------------------------------------------------------------ bundle
# configs/inference.json of Project-MONAI/model-zoo brain_image_synthesis_latent_diffusion_model (v1.0.0), the
# parts the loader reads, verbatim.
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
