"""y-aware contrastive learning: the kernel, the loss, covariates through the corpora, and the config check."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from common.config import load_config
from common.errors import ConfigError, DataError
from common.models import create_backbone
from pretrain.cli import main
from pretrain.config import PretrainConfig, validate
from pretrain.corpora import CorpusStream, build_source, require_covariates
from pretrain.objectives import YAwareContrastive
from pretrain.objectives.simclr import nt_xent
from pretrain.objectives.yaware import kernel_weights, yaware_nce
from synth.subject import corpus_plan
from tests.pretrain.conftest import tiny_config, write_yaml


def test_kernel_weights_match_a_hand_computed_case():
    w = kernel_weights(torch.tensor([20.0, 30.0]), torch.tensor([20.0, 30.0, 40.0]), sigma=10.0)
    expected = [[1.0, math.exp(-0.5), math.exp(-2.0)], [math.exp(-0.5), 1.0, math.exp(-0.5)]]
    assert torch.allclose(w, torch.tensor(expected), atol=1e-7)


def test_yaware_loss_matches_a_hand_computed_value_and_narrows_to_nt_xent():
    # two subjects, unit embeddings at 0° / 90° (view 1) and 0° / 180° (view 2), ages 20 and 30, sigma 10
    z1, z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    age, T, sigma = torch.tensor([20.0, 30.0]), 0.5, 10.0
    views = torch.cat([z1, z2])  # a1, a2, b1, b2
    ages = [20.0, 30.0, 20.0, 30.0]
    total = 0.0
    for i in range(4):
        others = [j for j in range(4) if j != i]
        s = {j: float(views[i] @ views[j]) / T for j in others}
        log_norm = math.log(sum(math.exp(v) for v in s.values()))
        w = {j: math.exp(-((ages[i] - ages[j]) ** 2) / (2 * sigma**2)) for j in others}
        total += -sum(w[j] / sum(w.values()) * (s[j] - log_norm) for j in others)
    assert yaware_nce(z1, z2, age, T, sigma).item() == pytest.approx(total / 4, rel=1e-6)
    torch.manual_seed(0)
    a, b, y = torch.randn(5, 8), torch.randn(5, 8), torch.tensor([20.0, 35.0, 50.0, 65.0, 80.0])
    assert yaware_nce(a, b, y, 0.2, sigma=0.01).item() == pytest.approx(nt_xent(a, b, 0.2).item(), rel=1e-5)
    chance = yaware_nce(torch.ones(4, 8), torch.ones(4, 8), y[:4], 0.2, 5.0).item()
    assert chance == pytest.approx(math.log(7), rel=1e-6)  # all similarities equal: ln(2B - 1)


def test_yaware_trains_a_vit_and_a_cnn():
    batch = {"view1": torch.rand(4, 1, 16, 16, 16), "view2": torch.rand(4, 1, 16, 16, 16)}
    batch["age"] = torch.tensor([25.0, 40.0, 60.0, 75.0])
    for encoder in (
        create_backbone("vit_base_p16", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=4),
        create_backbone("resnet18", img_size=16, widen_factor=0.25),
    ):
        model = YAwareContrastive(encoder, proj_hidden=32, proj_dim=8, sigma=5.0)
        loss = model(batch)["loss"]
        loss.backward()
        assert torch.isfinite(loss) and any(p.grad is not None for p in model.encoder.parameters())


def config(**overrides) -> PretrainConfig:
    return load_config(PretrainConfig, None, [f"{k}={v}" for k, v in overrides.items()])


def test_a_corpus_without_age_is_refused_at_validation(tmp_path):
    with pytest.raises(ConfigError, match="corpus video has no age"):
        validate(config(corpus="video", **{"objective.name": "yaware"}))
    with pytest.raises(ConfigError, match="corpus packed has no age"):
        validate(config(corpus="packed", **{"objective.name": "yaware"}))
    with pytest.raises(ConfigError, match="folder of NIfTI files has none"):
        validate(config(corpus="medical", **{"objective.name": "yaware", "data.medical.directory": str(tmp_path)}))
    validate(config(corpus="synthmri", **{"objective.name": "yaware"}))
    validate(config(corpus="video", **{"objective.name": "simclr"}))


def first_batch(cfg, covariates=("age",)) -> dict:
    stream = CorpusStream(build_source(cfg), cfg.train.seed, batch_size=2, covariates=covariates)
    return next(iter(stream))


def test_synthmri_batches_carry_the_subject_plans_age():
    cfg = config(corpus="synthmri", **{"data.spacing": "[6.0,6.0,6.0]", "data.shape": "[16,16,16]"})
    source = build_source(cfg)
    batch = first_batch(cfg)
    expected = [corpus_plan(source.synth_cfg, cfg.train.seed, p).age for p in (0, 1)]
    assert batch["age"].dtype == torch.float32
    assert np.allclose(batch["age"].numpy(), expected, atol=1e-3)


def test_medical_batches_carry_the_manifests_age_and_skip_rows_without(nifti_dir, tmp_path):
    files = [nifti_dir / "s1.nii.gz", nifti_dir / "s2.nii.gz", nifti_dir / "site2" / "s3.nii.gz"]
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [str(f) for f in files], "subject_id": ["a", "b", "c"], "age": [30, 50, 70]}).to_csv(
        manifest, index=False
    )
    settings = {"data.medical.manifest": str(manifest), "data.shape": "[16,16,16]", "data.spacing": "[4,4,4]"}
    cfg = config(corpus="medical", **settings)
    source = build_source(cfg)
    batch = first_batch(cfg)
    seen = sorted(float(a) for a in batch["age"])
    assert set(seen) <= {30.0, 50.0, 70.0} and len(seen) == 2
    assert source.covariate(0, "age") in (30.0, 50.0, 70.0)
    pd.DataFrame({"path": [str(f) for f in files], "subject_id": ["a", "b", "c"]}).to_csv(manifest, index=False)
    with pytest.raises(DataError, match="no age column"):
        require_covariates(build_source(cfg), ("age",))


def test_a_yaware_run_and_a_queued_simclr_run_train_through_the_cli(nifti_dir, tmp_path, capsys):
    files = [nifti_dir / "s1.nii.gz", nifti_dir / "s2.nii.gz", nifti_dir / "site2" / "s3.nii.gz"]
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [str(f) for f in files], "subject_id": ["a", "b", "c"], "age": [30, 50, 70]}).to_csv(
        manifest, index=False
    )
    medical = {"medical": {"manifest": str(manifest), "crop_from": [20, 20, 20]}, "num_workers": 0}
    runs = {
        "yaware": {"name": "yaware", "contrastive": {"proj_hidden": 32, "proj_dim": 16, "sigma": 10.0}},
        "simclr": {"name": "simclr", "contrastive": {"proj_hidden": 32, "proj_dim": 16, "queue_size": 8}},
    }
    for name, objective in runs.items():
        cfg = write_yaml(tmp_path / f"{name}.yaml", tiny_config(data=medical, objective=objective))
        out = tmp_path / name
        assert main(["--corpus", "medical", "--config", cfg, "--out", str(out)]) == 0, capsys.readouterr().err
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["step"] == 4 and math.isfinite(result["loss"]) and result["bad_items"] == 0
        assert (out / "export" / "model.safetensors").is_file()
    queue = torch.load(next((tmp_path / "simclr" / "checkpoints").glob("step*/mp_rank_00_model_states.pt")))
    queue = {k: v for k, v in queue["module"].items() if k.startswith("queue.")}
    assert int(queue["queue.filled"]) == 8 and queue["queue.keys"].norm(dim=1).allclose(torch.ones(8))
