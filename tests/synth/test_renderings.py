"""Renderings: one subject's anatomy by several scanners (``synth.subject.rendering``, ``generate --renderings``)."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pandas as pd
import pytest
import torch

from synth.cli import main
from synth.config import SynthConfig
from synth.dataset import GeneratedDirectory, SyntheticMRIStream
from synth.generator import Generator
from synth.subject import corpus_plan, rendering

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rendering_0_is_the_volume_made_before_renderings_existed(cfg4):
    plan = corpus_plan(cfg4, 7, 0)
    assert rendering(cfg4, plan, 0) is plan
    # the effects fixed, so that the check is of the generator's draws (pose, deformation, noise, bias), not of
    # how atrophy is sampled; recorded with the generator of commit 673f5df, before renderings existed
    effects = replace(plan.effects, ventricle_mm=1.0, hippocampus_mm=0.5, cortical_thinning=0.2, pattern_thinning=0.0)
    plan = replace(plan, effects=effects)
    image = Generator(cfg4)(plan).image.double()
    assert float(image.sum()) == pytest.approx(15096.90606380193, rel=1e-6)
    assert float(image.pow(2).sum()) == pytest.approx(7619.539197853808, rel=1e-6)


@pytest.mark.parametrize("pipeline", ["raw", "t1-linear"])
def test_a_rescan_is_the_same_anatomy_by_another_scanner(pipeline):
    cfg = SynthConfig(spacing=4.0)
    cfg.pipeline.name = pipeline
    # with t1-linear each scan is registered on its own: a residual pose of its own, set to none here so that the
    # label maps can be compared voxel for voxel (with one, they differ by it: tested below)
    cfg.pipeline.rotation_deg = cfg.pipeline.translation_mm = cfg.pipeline.scaling = 0.0
    gen, plan = Generator(cfg), corpus_plan(cfg, 7, 0)
    rescan = rendering(cfg, plan, 1)
    assert (rescan.subject_id, rescan.age, rescan.effects) == (plan.subject_id, plan.age, plan.effects)
    assert rescan.scanner != plan.scanner and rescan.rendering == 1
    first, second = gen(plan, with_labels=True), gen(rescan, with_labels=True)
    assert torch.equal(first.labels, second.labels)  # pose, deformation, atrophy: the same
    assert (first.image - second.image).abs().mean() > 0.01  # contrast, bias, noise, resolution: another scanner
    assert torch.equal(gen(rendering(cfg, plan, 1)).image, second.image)  # a pure function of (plan, r)
    assert not torch.equal(gen(rendering(cfg, plan, 2)).image, second.image)


def test_a_registered_rescan_has_its_own_residual_pose(cfg4):
    gen, plan = Generator(cfg4), corpus_plan(cfg4, 7, 0)
    assert not torch.equal(gen.labels(plan)[0], gen.labels(rendering(cfg4, plan, 1))[0])


def test_the_stream_renders_a_position_by_another_scanner(cfg4):
    stream = SyntheticMRIStream(cfg4, seed=7)
    assert torch.equal(stream.volume(0), Generator(cfg4)(corpus_plan(cfg4, 7, 0)).image)
    assert torch.equal(stream.volume(0, 1), Generator(cfg4)(rendering(cfg4, corpus_plan(cfg4, 7, 0), 1)).image)


def _generate(out, *extra: str, n: int = 2) -> int:
    argv = ["generate", "--out", str(out), "--n", str(n), "--seed", "5", "--spacing", "4", "--workers", "1"]
    return main([*argv, "--no-progress", *extra])


def test_generate_writes_each_rendering_as_a_session_and_resumes(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert _generate(out, "--renderings", "2") == 0
    table = pd.read_csv(out / "manifest.csv")
    assert table["subject_id"].tolist() == ["sub-000000"] * 2 + ["sub-000001"] * 2
    assert table["rendering"].tolist() == [0, 1, 0, 1]
    assert table["session_id"].tolist() == ["ses-1", "ses-2"] * 2
    assert table["path"].tolist()[:2] == ["images/sub-000000_ses-1.nii.gz", "images/sub-000000_ses-2.nii.gz"]
    assert table.groupby("subject_id")["age"].nunique().eq(1).all()  # one subject, its covariates
    files = GeneratedDirectory(out)  # common's manifest reader: two sessions of a subject are two images
    assert files.renderings == 2 and files.subject_rows == [[0, 1], [2, 3]]
    assert not torch.equal(files[0], files[1])

    made = (out / "images" / "sub-000001_ses-2.nii.gz").read_bytes()
    (out / "images" / "sub-000001_ses-2.nii.gz").unlink()  # a killed run: the rest is kept, this one remade
    assert _generate(out, "--renderings", "2") == 0
    assert (out / "images" / "sub-000001_ses-2.nii.gz").read_bytes() == made
    assert pd.read_csv(out / "manifest.csv").equals(table)

    assert _generate(out, "--renderings", "3") == 2  # another K into the same folder: refused
    err = capsys.readouterr().err
    assert err.startswith("error:") and "job.renderings: 2 before" in err


def test_one_rendering_keeps_the_files_and_manifest_of_before(tmp_path):
    assert _generate(tmp_path / "one", n=1) == 0
    table = pd.read_csv(tmp_path / "one" / "manifest.csv")
    assert table["path"].tolist() == ["images/sub-000000.nii.gz"] and table["session_id"].tolist() == ["ses-1"]
    assert "renderings" not in (tmp_path / "one" / "synth.yaml").read_text()  # older folders still resume
    assert GeneratedDirectory(tmp_path / "one").renderings == 1


def test_shards_of_renderings_merge_into_the_unsharded_manifest(tmp_path, capsys):
    assert _generate(tmp_path / "whole", "--renderings", "2") == 0
    sharded = tmp_path / "sharded"
    for shard in ("1/2", "2/2"):
        assert _generate(sharded, "--renderings", "2", "--shard", shard) == 0
    assert main(["merge", "--out", str(sharded)]) == 0
    assert (sharded / "manifest.csv").read_bytes() == (tmp_path / "whole" / "manifest.csv").read_bytes()
    other = tmp_path / "other"  # shard 2/2 made with one rendering elsewhere, copied in: merge refuses it
    assert _generate(other, "--shard", "2/2") == 0
    for suffix in ("csv", "json"):
        shutil.copy(other / f"manifest.shard-2-of-2.{suffix}", sharded / f"manifest.shard-2-of-2.{suffix}")
    capsys.readouterr()
    assert main(["merge", "--out", str(sharded)]) == 2
    assert "job.renderings: 2 in shard 1/2" in capsys.readouterr().err
