"""Packed shards: written from a manifest, read back equal to the preprocessed volumes (within the stated
quantisation), resumable, and served by the ``packed`` corpus."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from common.data import PreprocessConfig, load_volume
from common.data.packed import PackedVolumes, pack_manifest
from common.errors import ConfigError
from pretrain.cli import main
from pretrain.config import PackedConfig
from pretrain.corpora.packed import PackedSource
from pretrain.pack import main as pack_main
from tests.pretrain.conftest import tiny_config, write_yaml

GOOD = ["s1.nii.gz", "s2.nii.gz", "site2/s3.nii.gz"]


@pytest.fixture
def manifest(tmp_path, nifti_dir):
    """The three good volumes and the broken file, in a manifest (paths relative to it)."""
    path = tmp_path / "manifest.csv"
    names = [GOOD[0], "broken.nii.gz", *GOOD[1:]]
    pd.DataFrame({"path": [str(nifti_dir / n) for n in names], "subject_id": ["a", "bad", "b", "c"]}).to_csv(
        path, index=False
    )
    return path


@pytest.mark.parametrize(
    "intensity, dtype, tolerance",
    [("zscore", "float16", lambda x: np.abs(x) * 2.0**-11), ("percentile", "uint8", lambda x: 0.5 / 255 + 1e-6)],
)
def test_packed_volumes_read_back_as_preprocessed(tmp_path, manifest, nifti_dir, intensity, dtype, tolerance):
    cfg = PreprocessConfig(spacing=(4.0, 4.0, 4.0), shape=(20, 18, 20), intensity=intensity)
    index = pack_manifest(manifest, tmp_path / "pack", cfg, dtype=dtype, per_shard=2)
    volumes = PackedVolumes(tmp_path / "pack")
    assert len(volumes) == 3 and volumes.table["subject_id"].tolist() == ["a", "b", "c"]  # broken one skipped
    assert volumes.table["shard"].tolist() == [0, 1, 1] and index.name == "index.csv"
    skipped = pd.read_csv(tmp_path / "pack" / "shard-00000.csv")
    assert skipped["offset"].tolist() == [0, -1] and "broken.nii.gz" in skipped["error"][1]
    settings = json.loads((tmp_path / "pack" / "pack.json").read_text())
    assert settings["preprocess"]["intensity"] == intensity and settings["dtype"] == dtype
    assert volumes.preprocess == cfg and volumes.packed(0).dtype == np.dtype(dtype)
    for i, name in enumerate(GOOD):
        expected = load_volume(nifti_dir / name, cfg).numpy()
        got = volumes[i]
        assert got.dtype == torch.float32 and got.shape == (1, 20, 18, 20)
        assert (np.abs(got.numpy() - expected) <= tolerance(expected)).all()
        assert torch.equal(volumes.crop(i, (1, 2, 3), (8, 8, 8)), got[:, 1:9, 2:10, 3:11])


def test_rerun_resumes_and_other_settings_are_refused(tmp_path, manifest):
    cfg = PreprocessConfig(spacing=(4.0, 4.0, 4.0), shape=(20, 20, 20), intensity="zscore")
    pack_manifest(manifest, tmp_path / "pack", cfg, per_shard=2)
    shard = tmp_path / "pack" / "shard-00001.npy"
    before = shard.stat().st_mtime_ns
    (tmp_path / "pack" / "shard-00000.csv").unlink()  # an unfinished shard is packed again
    pack_manifest(manifest, tmp_path / "pack", cfg, per_shard=2)
    assert shard.stat().st_mtime_ns == before and (tmp_path / "pack" / "shard-00000.csv").is_file()
    with pytest.raises(ConfigError, match="other settings"):
        pack_manifest(manifest, tmp_path / "pack", PreprocessConfig(spacing=(4.0,) * 3, shape=(16,) * 3))


def test_pack_command_errors_are_one_line(tmp_path, manifest, capsys):
    argv = ["--manifest", str(manifest), "--out", str(tmp_path / "p"), "--spacing", "4", "--shape", "20", "20", "20"]
    assert pack_main([*argv, "--intensity", "zscore", "--dtype", "uint8"]) == 2
    assert capsys.readouterr().err.startswith("error: uint8 packing stores [0, 1]")
    assert not (tmp_path / "p").exists()  # checked before anything is written
    argv[3] = str(tmp_path / "none")
    assert pack_main([*argv, "--intensity", "none", "--dtype", "uint8"]) == 2  # values up to 1.5: all skipped
    assert "no image could be packed" in capsys.readouterr().err
    argv[3] = str(tmp_path / "percentile")
    assert pack_main([*argv, "--intensity", "percentile", "--dtype", "uint8", "--workers", "2"]) == 0
    assert len(PackedVolumes(tmp_path / "percentile")) == 3


def test_packed_corpus_crops_and_trains(tmp_path, manifest):
    cfg = PreprocessConfig(spacing=(4.0, 4.0, 4.0), shape=(20, 20, 20), intensity="zscore")
    pack_manifest(manifest, tmp_path / "pack", cfg)
    source = PackedSource(PackedConfig(directory=str(tmp_path / "pack"), flip_prob=0.0), [16] * 3, [4.0] * 3)
    item = source.item(5, np.random.default_rng(0))
    assert item.shape == (1, 16, 16, 16) and item.dtype == torch.float32
    with pytest.raises(ConfigError, match="smaller than data.shape"):
        PackedSource(PackedConfig(directory=str(tmp_path / "pack")), [24] * 3, [4.0] * 3)
    with pytest.raises(ConfigError, match="spacing"):
        PackedSource(PackedConfig(directory=str(tmp_path / "pack")), [16] * 3, [2.0] * 3)
    run = tiny_config(
        data={"num_workers": 0, "packed": {"directory": str(tmp_path / "pack")}},
        train={"steps": 2, "image_every": 0, "checkpoint_every": 0},
    )
    args = ["--corpus", "packed", "--config", write_yaml(tmp_path / "c.yaml", run), "--out", str(tmp_path / "run")]
    assert main(args) == 0
