"""synth/ldm/train.py (with run_state, train_autoencoder, train_diffusion): run folder, resume, PatchGAN."""

from __future__ import annotations

import json

import pytest
from ldm_toys import TINY

from common.errors import ConfigError
from synth.ldm.cli import main
from synth.ldm.config import AutoencoderTraining, LDMDataConfig, LDMTrainConfig
from synth.ldm.load import load_model
from synth.ldm.run_state import load_state
from synth.ldm.train import train_ldm


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


def test_bf16_training_is_checked_first_and_stays_finite(corpus, tmp_path, caplog):
    """Both networks (and the PatchGAN) are checked before they train in bf16 (common.bf16_check): the log says
    so for each, and the losses stay finite."""
    caplog.set_level("INFO")
    steps = ["train_autoencoder.steps=2", "train_diffusion.steps=2", "train_autoencoder.adv_weight=0.1"]
    out = tmp_path / "bf16"
    args = ["ldm-train", "--manifest", str(corpus), "--out", str(out), *TINY, *steps, "train_autoencoder.disc_layers=2"]
    assert main([*args, "precision=bf16"]) == 0
    for name in ("autoencoder", "diffusion UNet"):
        assert f"precision bf16, {name} -> bf16: bf16 as asked" in caplog.text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(v == v and abs(v) < 1e6 for r in records for k, v in r.items() if k in ("loss", "d_loss"))
