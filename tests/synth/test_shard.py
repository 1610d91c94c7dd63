"""Sharded generation: K/N index ranges whose union is byte-identical to the unsharded run, and merge."""

from __future__ import annotations

import json
import shutil

import pytest

from synth.cli import main
from synth.shard import Shard

pytestmark = pytest.mark.usefixtures("one_thread")


def _cohort(out, *extra: str, n: int = 3, seed: int = 5) -> int:
    argv = ["cohort", "--task", "pd", "--out", str(out), "--n", str(n), "--sites", "2", "--seed", str(seed)]
    return main([*argv, "--spacing", "4", "--workers", "1", "--no-progress", *extra])


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shard_ranges_are_disjoint_and_cover_all():
    for n, count in [(3, 2), (10, 3), (7, 7)]:
        ranges = [Shard(k, count).indices(n) for k in range(1, count + 1)]
        assert [i for r in ranges for i in r] == list(range(n))


def test_union_of_shards_is_byte_identical_to_the_unsharded_run(tmp_path, capsys):
    assert _cohort(tmp_path / "whole") == 0
    sharded = tmp_path / "sharded"
    assert _cohort(sharded, "--shard", "2/2") == 0  # shards run in any order into one folder
    assert main(["merge", "--out", str(sharded)]) == 2  # shard 1 missing: refused, named
    assert "shards 1/2 have not finished" in capsys.readouterr().err
    assert not (sharded / "manifest.csv").exists()
    assert _cohort(sharded, "--shard", "1/2") == 0
    assert sorted(p.name for p in sharded.glob("manifest*")) == [
        "manifest.shard-1-of-2.csv",
        "manifest.shard-1-of-2.json",  # the settings each shard was made with
        "manifest.shard-2-of-2.csv",
        "manifest.shard-2-of-2.json",
    ]
    assert main(["merge", "--out", str(sharded)]) == 0
    whole, union = _files(tmp_path / "whole"), _files(sharded)
    for name in ("manifest.shard-1-of-2.csv", "manifest.shard-2-of-2.csv"):
        union.pop(name)
        union.pop(name.replace(".csv", ".json"))
    assert union.keys() == whole.keys() and len(whole) == 2 * 3 + 2  # images, labels, manifest, synth.yaml
    assert union == whole


@pytest.mark.parametrize("shard", ["0/2", "3/2", "2", "a/b"])
def test_bad_shard_is_one_line(tmp_path, capsys, shard):
    assert _cohort(tmp_path / "x", "--shard", shard) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --shard") and len(err.strip().splitlines()) == 1


def _copy_shard(source, target, k: int, count: int, *suffixes: str) -> None:
    for suffix in suffixes:
        name = f"manifest.shard-{k}-of-{count}.{suffix}"
        shutil.copy(source / name, target / name)


def test_merge_refuses_shards_made_with_other_settings(tmp_path, capsys):
    # a job array where one task ran with another seed in its own folder, then was copied into the shared one
    shared, other = tmp_path / "shared", tmp_path / "other"
    assert _cohort(shared, "--shard", "1/2", n=2) == 0 and _cohort(other, "--shard", "2/2", n=2, seed=6) == 0
    _copy_shard(other, shared, 2, 2, "csv", "json")
    assert main(["merge", "--out", str(shared)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.shard-2-of-2.json" in err
    assert "job.seed: 5 in shard 1/2, 6 here" in err and not (shared / "manifest.csv").exists()
    (shared / "manifest.shard-2-of-2.json").unlink()  # a manifest copied without its record: settings unknown
    assert main(["merge", "--out", str(shared)]) == 2
    assert "manifest.shard-2-of-2.json: is missing" in capsys.readouterr().err
    assert _cohort(shared, "--shard", "2/2", n=2) == 0  # the right shard, then its rows swapped for the other seed's
    assert main(["merge", "--out", str(shared)]) == 0
    _copy_shard(other, shared, 2, 2, "csv")
    assert main(["merge", "--out", str(shared)]) == 2
    err = capsys.readouterr().err
    assert "manifest.shard-2-of-2.csv: holds rows with seed 6, but the shards were made with seed 5" in err
    record = json.loads((shared / "manifest.shard-1-of-2.json").read_text())  # --n is recorded too
    assert record["n"] == 2 and record["config"]["spacing"] == 4.0 and record["job"]["task"] == "pd"
