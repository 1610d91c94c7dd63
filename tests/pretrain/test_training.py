"""The training loop in a world of one: kill-and-resume, NaN steps, the bad-item limit, DeepSpeed config."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.config import load_config, save_config
from common.errors import ConfigError
from common.models import create_backbone
from pretrain.cli import main, parse_args
from pretrain.config import PretrainConfig
from pretrain.corpora.stream import CorpusStream, make_loader
from pretrain.engine import Engine, build_ds_config, init_distributed, param_groups
from pretrain.objectives import build_objective
from pretrain.provenance import export_metadata
from pretrain.trainer import Trainer, TrainingDiverged
from tests.common.test_weights import hostile_deepspeed_folder
from tests.pretrain.conftest import TINY_VIT, tiny_config, write_yaml

REPO = Path(__file__).resolve().parents[2]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(x["step"], x["loss"]) for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint_exactly(tmp_path):
    cfg = write_yaml(
        tmp_path / "c.yaml",
        tiny_config(train={"steps": 6, "checkpoint_every": 2, "log_every": 1, "image_every": 0, "precision": "fp32"}),
    )
    args = ["--corpus", "synthmri", "--config", cfg]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0  # uninterrupted reference

    killed = tmp_path / "killed"
    # a fresh process of its own (this one may already hold a world of one: drop its rendezvous variables),
    # SIGKILLed by itself right after its step-2 checkpoint is on disk: no polling, no race with a fast machine
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps([{"argv": [*args, "--out", str(killed)], "kill_at": "step00000002"}]))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests/pretrain/ds_driver.py"), str(runs)], cwd=REPO, env=env, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL
    latest = killed / "checkpoints" / "latest"
    assert latest.read_text().strip() == "step00000002"

    # resumed with another DataLoader worker count: the stream position, not the workers, decides the batches
    args += ["data.num_workers=2"]
    assert main(args + ["--out", str(killed), "--resume", "auto"]) == 0
    resumed, ref = losses(killed), losses(tmp_path / "ref")
    assert [step for step, _ in resumed] == [step for step, _ in ref]  # each step once, none twice
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in ref], abs=1e-6)
    a = load_file(tmp_path / "ref" / "export" / "encoder.safetensors")
    b = load_file(killed / "export" / "encoder.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert main(args + ["--out", str(killed)]) == 2  # a fresh run refuses a folder with checkpoints


class NaNSource:
    """Random volumes, NaN at positions divisible by ``every`` (1: all of them)."""

    name = "nan-test"

    def __init__(self, every):
        self.every = every

    def item(self, position, rng):
        if position % self.every == 0:
            return torch.full((1, 16, 16, 16), float("nan"))
        return torch.from_numpy(rng.random((1, 16, 16, 16), dtype="float32"))


def make_trainer(tmp_path, every, streak=10, optim=None, log_every=4):
    init_distributed()
    cfg = load_config(
        PretrainConfig,
        write_yaml(
            tmp_path / "c.yaml",
            tiny_config(
                data={"num_workers": 0},
                train={
                    "steps": 4,
                    "log_every": log_every,
                    "image_every": 0,
                    "checkpoint_every": 0,
                    "max_nonfinite_streak": streak,
                    "precision": "fp32",
                },
                optim=optim or {},
            ),
        ),
    )
    objective = build_objective(cfg.objective, create_backbone("vit_base_p16", img_size=16, **TINY_VIT))
    engine = Engine(objective, build_ds_config(cfg, None, 1, "fp32"))
    loader = lambda pos: make_loader(CorpusStream(NaNSource(every), 0, batch_size=2, **pos.stream_kwargs()), 0, 2)
    return Trainer(cfg, tmp_path / "run", engine, objective, loader, export_metadata(cfg))


def test_nonfinite_losses_skip_the_step_and_are_counted(tmp_path):
    result = make_trainer(tmp_path, every=3).run()  # batches (0,1) (2,3) hold a NaN volume, (4,5) does not …
    assert result["step"] == 4 and result["nonfinite"] == 8 and math.isfinite(result["loss"])
    weights = load_file(tmp_path / "run" / "export" / "encoder.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_run_of_nonfinite_losses_stops_with_a_clear_message(tmp_path):
    with pytest.raises(TrainingDiverged, match="NaN/Inf for 3 micro-batches in a row") as error:
        make_trainer(tmp_path, every=1, streak=3).run()
    assert "no checkpoint was written yet" in str(error.value)  # it names no checkpoint that does not exist


def test_warm_up_trains_from_the_first_step_and_the_logged_lr_is_the_lr_used(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # a run killed before its first checkpoint left these; a fresh start must not append to them
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    trainer = make_trainer(tmp_path, every=10**6, optim={"lr": 1e-3, "warmup_steps": 2}, log_every=1)
    used = []
    step = trainer.engine.step
    trainer.engine.step = lambda: (used.append(trainer.engine.optimizer.param_groups[0]["lr"]), step())[1]
    trainer.run()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert used[:2] == pytest.approx([5e-4, 1e-3])  # 1/2, then 2/2 of the peak: no step at lr 0
    assert [r["lr"] for r in rows] == pytest.approx(used)


def test_an_output_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config())
    assert main(["--corpus", "synthmri", "--config", cfg, "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'out'}: --out is a file" in capsys.readouterr().err


def test_a_resume_with_other_architecture_or_data_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "step00000002").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step00000002")
    save_config(load_config(PretrainConfig, write_yaml(tmp_path / "c.yaml", tiny_config())), out / "config.yaml")
    before = (out / "config.yaml").read_bytes()
    args = ["--corpus", "synthmri", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--resume", "auto"]
    assert main(args + ["model.kwargs.depth=3", "data.spacing=[2.0,2.0,2.0]"]) == 2
    err = capsys.readouterr().err
    assert "model.kwargs.depth: 2 -> 3" in err and "data.spacing" in err and "train.steps" not in err
    assert (out / "config.yaml").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml"]


@pytest.mark.parametrize(
    "change, named",
    [
        ("objective.mae.mask_ratio=0.5", "objective.mae.mask_ratio: 0.75 -> 0.5"),
        ("objective.contrastive.temperature=0.1", "objective.contrastive.temperature: 0.2 -> 0.1"),
        ("objective.name=simclr", "objective.name: 'mae' -> 'simclr'"),
    ],
    ids=["mask_ratio", "temperature", "name"],
)
def test_a_resume_with_other_objective_settings_is_refused_naming_the_key(tmp_path, capsys, change, named):
    # the objective's settings decide what the checkpoint's weights were trained for: a resume may not change them
    out = tmp_path / "run"
    (out / "checkpoints" / "step00000002").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step00000002")
    save_config(load_config(PretrainConfig, write_yaml(tmp_path / "c.yaml", tiny_config())), out / "config.yaml")
    args = ["--corpus", "synthmri", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--resume", "auto"]
    assert main([*args, change]) == 2
    err = capsys.readouterr().err
    assert "trained with other settings" in err and named in err, err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml"]


def test_a_resume_from_a_checkpoint_that_needs_code_runs_none_and_writes_nothing(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    bad = hostile_deepspeed_folder(tmp_path / "hostile", marker, zero_shards=False)
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config())
    out = tmp_path / "run"
    code = main(["--corpus", "synthmri", "--config", cfg, "--out", str(out), "--resume", str(tmp_path / "hostile")])
    assert code == 2 and f"{bad}: this file needs full pickle" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()


def test_overrides_may_follow_option_flags():
    args = parse_args(["--corpus", "synthmri", "optim.lr=1e-4", "--out", "O", "train.steps=3"])
    assert args.out == "O" and args.overrides == ["optim.lr=1e-4", "train.steps=3"]


def test_too_many_unreadable_items_stop_the_run(tmp_path, video_dir, capsys):
    cfg = tiny_config(
        data={
            "shape": [8, 16, 16],
            "max_bad_share": 0.1,
            "min_items_for_bad_share": 4,
            "video": {
                "paths": [
                    str(video_dir / "corrupt.mp4"),
                    str(video_dir / "video_000.mp4"),
                    str(video_dir / "still_short.mp4"),
                ]
            },
        },
        model={"kwargs": {**TINY_VIT, "patch_size": [4, 8, 8]}},
    )
    code = main(
        [
            "--corpus",
            "video",
            "--config",
            write_yaml(tmp_path / "c.yaml", cfg),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    assert "data.max_bad_share=10%" in capsys.readouterr().err


def test_deepspeed_json_may_not_contradict_the_recipe(tmp_path):
    cfg = load_config(PretrainConfig)
    ds = build_ds_config(cfg, REPO / "configs/deepspeed/zero2.json", 2, "bf16")
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == cfg.data.batch_size * 2
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    for bad, match in [
        ({"train_micro_batch_size_per_gpu": 99}, "train_micro_batch_size_per_gpu"),
        ({"bf16": {"enabled": True}}, "train.precision"),
        ({"zero_optimization": {"stage": 4}}, "stage"),
    ]:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=match):
            build_ds_config(cfg, path, 1, "fp32")


def test_weight_decay_is_off_for_norms_biases_and_position_embeddings():
    cfg = load_config(PretrainConfig)
    # a learnt position embedding: a 3-D tensor that only its name (no_weight_decay) keeps out of decay
    encoder = create_backbone("vit_base_p16", img_size=16, pos_embed="learn", **TINY_VIT)
    objective = build_objective(cfg.objective, encoder)
    decay, no_decay = param_groups(objective, 0.05)
    names = {id(p): n for n, p in objective.named_parameters()}
    off = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert {"encoder.cls_token", "mask_token", "encoder.norm.weight", "encoder.blocks.0.attn.qkv.bias"} <= off
    assert "encoder.pos_embed" in off and encoder.pos_embed.requires_grad and encoder.pos_embed.ndim == 3
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    # the fixed sin-cos decoder embedding is not trained: in neither group
    assert "decoder_pos_embed" not in off | {names[id(p)] for p in decay["params"]}


def test_bf16_runs_the_matmuls_in_bf16_with_bf16_weights_and_fp32_masters():
    init_distributed()
    cfg = load_config(
        PretrainConfig,
        overrides=["data.batch_size=2", "train.steps=3", "optim.warmup_steps=1", "optim.lr=0.05"],
    )
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    dtypes = []
    net[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, batch):
            return {"loss": (self.net(batch["x"]).float() - batch["y"]).pow(2).mean()}

    engine = Engine(Regression(), build_ds_config(cfg, None, 1, "bf16"))
    x = torch.randn(64, 8)
    batch = {"x": x, "y": x.sum(1, keepdim=True)}
    first = engine(batch)["loss"].item()
    for _ in range(3):
        loss = engine(batch)["loss"]
        engine.backward(loss)
        engine.step()
    assert dtypes[0] == torch.bfloat16 and net[0].weight.dtype == torch.bfloat16
    assert engine.masters[net[0].weight].dtype == torch.float32
    assert engine(batch)["loss"].item() < first


OLD = Path(__file__).parent / "data"  # written by the code before pretrain and finetune spoke one vocabulary


def test_a_run_saved_before_the_config_keys_were_renamed_resumes(tmp_path, capsys, caplog):
    """``run_config_before_one_vocabulary.yaml`` is the ``config.yaml`` the previous version saved for
    ``recipe_before_one_vocabulary.yaml`` (``data.input_size``, now ``data.shape``): its run resumes, and a real
    change of a renamed key is still refused."""
    out = tmp_path / "run"
    args = ["--corpus", "synthmri", "--config", str(OLD / "recipe_before_one_vocabulary.yaml"), "--out", str(out)]
    assert main(args) == 0
    assert "'data.input_size' is deprecated; it now reads 'data.shape'" in caplog.text
    (out / "config.yaml").write_text((OLD / "run_config_before_one_vocabulary.yaml").read_text())
    capsys.readouterr()
    assert main([*args, "--resume", "auto", "data.shape=[8,8,8]"]) == 2
    assert "data.shape: [16, 16, 16] -> [8, 8, 8]" in capsys.readouterr().err
    assert main([*args, "--resume", "auto", "train.steps=3"]) == 0
    assert [step for step, _ in losses(out)] == [1, 2, 3]
