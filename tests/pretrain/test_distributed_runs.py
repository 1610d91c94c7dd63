"""Two-rank DeepSpeed runs on CPU (gloo), one per corpus, launched once: checkpoints, TensorBoard events read
back, and an export that ``common`` loads strictly."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.checkpoint import load_export
from tests.pretrain.conftest import tiny_config, write_yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_specs(tmp, nifti_dir, video_dir):
    medical = {"medical": {"directory": str(nifti_dir), "crop_from": [20, 20, 20]}}
    video = {"video": {"paths": [str(video_dir)], "stride": 1}}
    tube_vit = {
        "backbone": "vit_base_p16",
        "kwargs": {"patch_size": [4, 8, 8], "embed_dim": 32, "depth": 2, "num_heads": 4},
    }
    return {  # corpus -> (config, DeepSpeed JSON): every ZeRO stage and objective once
        "synthmri": (tiny_config(), "zero0.json"),
        "medical": (tiny_config(data=medical, objective={"name": "simclr"}), "zero1.json"),
        "video": (
            tiny_config(
                data={**video, "shape": [8, 16, 16]},
                model=tube_vit,
                objective={
                    "name": "mae",
                    "mae": {
                        "masking": "tube",
                        "mask_ratio": 0.5,
                        "decoder_dim": 32,
                        "decoder_depth": 1,
                        "decoder_heads": 4,
                    },
                },
            ),
            "zero3.json",
        ),
        "mixed": (tiny_config(data={**medical, **video}, objective={"name": "moco"}), "zero2.json"),
    }


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, nifti_dir, video_dir):
    tmp = tmp_path_factory.mktemp("ds")
    runs = []
    for corpus, (cfg, ds_json) in run_specs(tmp, nifti_dir, video_dir).items():
        runs.append(
            [
                "--corpus",
                corpus,
                "--config",
                write_yaml(tmp / f"{corpus}.yaml", cfg),
                "--out",
                str(tmp / corpus),
                "--deepspeed_config",
                str(REPO / "configs/deepspeed" / ds_json),
            ]
        )
    # the synthmri run again, stopped right after its step-2 checkpoint on both ranks, then resumed
    resumed = [*runs[0][:5], str(tmp / "resumed"), *runs[0][6:]]
    runs += [{"argv": resumed, "interrupt_at": "step00000002"}, [*resumed, "--resume", "auto"]]
    (tmp / "runs.json").write_text(json.dumps(runs))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_accelerators",
            "2",
            "--master_port",
            str(free_port()),
            str(REPO / "tests/pretrain/ds_driver.py"),
            str(tmp / "runs.json"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return tmp, proc.stdout + proc.stderr


@pytest.mark.parametrize("corpus", ["synthmri", "medical", "video", "mixed"])
def test_two_rank_run_writes_checkpoints_events_and_a_strict_export(two_rank_runs, corpus):
    tmp, log = two_rank_runs
    out = tmp / corpus
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000004"
    kept = sorted(p.name for p in (out / "checkpoints").glob("step*"))
    assert kept == ["step00000002", "step00000004"]
    assert (out / "config.yaml").is_file() and json.loads((out / "deepspeed.json").read_text())["train_batch_size"] == 4

    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    for tag in [
        "train/loss",
        "train/lr",
        "train/volumes_per_s",
        "train/data_wait_share",
        "train/memory_peak_gb",
    ]:
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3, 4], tag
    losses = [e.value for e in events.Scalars("train/loss")]
    assert all(v == v and abs(v) < 1e3 for v in losses)
    if corpus in ("synthmri", "video"):  # MAE runs log input / masked / reconstruction slices
        assert {"mae/input", "mae/masked", "mae/reconstruction"} <= set(tags["images"])
        assert [e.step for e in events.Images("mae/input")] == [2, 4]

    model, meta = load_export(out / "export" / "encoder.safetensors")  # strict: raises on any mismatch
    assert meta["corpus"] == corpus and meta["step"] == 4
    assert meta["objective"] == {"synthmri": "mae", "medical": "simclr", "video": "mae", "mixed": "moco"}[corpus]
    assert meta["input_size"] == ([8, 16, 16] if corpus == "video" else [16, 16, 16])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    if corpus == "video":
        assert lines[-1]["bad_items"] > 0  # the corrupt and the too-short file were skipped and counted
        assert "skipped item" in log
        # ZeRO-3 partitions every parameter over the ranks: the export must hold the whole, final weights,
        # equal to DeepSpeed's own consolidation of the last checkpoint
        full = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step00000004")
        exported = model.state_dict()
        encoder = {k.removeprefix("encoder."): v for k, v in full.items() if k.startswith("encoder.")}
        assert set(encoder) >= {k for k, v in model.named_parameters() if v.requires_grad}
        for name, value in encoder.items():
            assert torch.equal(exported[name].float(), value.float()), name


def test_a_two_rank_run_resumed_from_a_checkpoint_repeats_the_uninterrupted_run(two_rank_runs):
    tmp, log = two_rank_runs
    assert "resumed from" in log and "step00000002" in log
    lines = lambda out: [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps, ref = [x["step"] for x in lines(tmp / "resumed")], [x["step"] for x in lines(tmp / "synthmri")]
    assert steps == ref == [1, 2, 3, 4]
    losses = [x["loss"] for x in lines(tmp / "resumed")]
    assert losses == pytest.approx([x["loss"] for x in lines(tmp / "synthmri")], abs=1e-6)  # same batches per rank
    a, _ = load_export(tmp / "synthmri" / "export" / "encoder.safetensors")
    b, _ = load_export(tmp / "resumed" / "export" / "encoder.safetensors")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if name.endswith("attn.qkv.bias"):  # the key bias shifts every logit of a query alike: softmax ignores it,
            c = len(x) // 3  # so its true gradient is 0 and Adam scales the rounding noise up to lr-sized steps
            x, y = torch.cat([x[:c], x[2 * c :]]), torch.cat([y[:c], y[2 * c :]])
        assert torch.allclose(x, y, atol=1e-6), name
