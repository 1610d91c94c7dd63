"""Tiny data and configs shared by the pre-training tests."""

import numpy as np
import pytest
import yaml

from common.data import write_nifti
from synth.video import shape_frames, write_synthetic_videos, write_video

TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}


def tiny_config(**sections) -> dict:
    """A run config dict: 16³ volumes, a 2-block 32-wide ViT, 4 steps."""
    cfg = {
        "data": {
            "shape": [16, 16, 16],
            "spacing": [4.0, 4.0, 4.0],
            "batch_size": 2,
            "num_workers": 1,
            "prefetch_factor": 1,
        },
        "model": {"backbone": "vit_base_p16", "kwargs": dict(TINY_VIT)},
        "objective": {
            "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4},
            "contrastive": {"proj_hidden": 32, "proj_dim": 16, "crop_scale": [0.6, 1.0]},
        },
        "optim": {"lr": 1.0e-3, "warmup_steps": 1},
        "train": {"steps": 4, "log_every": 1, "image_every": 2, "checkpoint_every": 2, "precision": "fp32"},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def write_yaml(path, cfg) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="session")
def nifti_dir(tmp_path_factory):
    """Three 20³ brain-like volumes at 4 mm (one in a sub-folder) and one unreadable file."""
    folder = tmp_path_factory.mktemp("nifti")
    (folder / "site2").mkdir()
    rng = np.random.default_rng(0)
    for name in ["s1.nii.gz", "s2.nii.gz", "site2/s3.nii.gz"]:
        vol = np.zeros((20, 20, 20), np.float32)
        vol[2:18, 3:17, 2:18] = rng.uniform(0.5, 1.5, (16, 14, 16))
        write_nifti(vol, folder / name, spacing=(4.0, 4.0, 4.0))
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return folder


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory):
    """Two generated mp4 clips and a corrupt one."""
    folder = tmp_path_factory.mktemp("video")
    write_synthetic_videos(folder, 2, n_frames=24, height=32, width=32)
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    write_video(folder / "still_short.mp4", shape_frames(2, 32, 32, np.random.default_rng(5)))
    return folder
