"""Packed shards under bad input: a rerun retries the images it skipped, Ctrl-C is one line and resumable, and a
damaged pack folder is a DataError naming the file when it is opened."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import common.data.packed as packed
from common.data import PreprocessConfig, load_volume
from common.data.packed import PackedVolumes, pack_manifest
from common.errors import DataError
from pretrain.cli import main
from pretrain.pack import main as pack_main
from tests.pretrain.conftest import tiny_config, write_yaml

CFG = PreprocessConfig(spacing=(4.0, 4.0, 4.0), shape=(20, 20, 20), intensity="zscore")


def _manifest(path, names):
    pd.DataFrame({"path": names, "subject_id": [f"s{i}" for i in range(len(names))]}).to_csv(path, index=False)
    return path


def _pack_argv(manifest, out) -> list[str]:
    shape = ["--shape", "20", "20", "20"]
    return ["--manifest", str(manifest), "--out", str(out), "--spacing", "4", *shape, "--intensity", "zscore"]


def test_rerun_retries_images_it_skipped(tmp_path, nifti_dir, capsys):
    fixable = tmp_path / "fixable.nii.gz"
    fixable.write_bytes((nifti_dir / "broken.nii.gz").read_bytes())
    alone = _manifest(tmp_path / "alone.csv", [str(fixable)])
    assert pack_main(_pack_argv(alone, tmp_path / "alone")) == 2  # every image bad
    assert "no image could be packed" in capsys.readouterr().err
    manifest = _manifest(tmp_path / "m.csv", [str(nifti_dir / "s1.nii.gz"), str(fixable), str(nifti_dir / "s2.nii.gz")])
    pack_manifest(manifest, tmp_path / "pack", CFG, per_shard=2)
    assert len(PackedVolumes(tmp_path / "pack")) == 2
    untouched = (tmp_path / "pack" / "shard-00001.npy").stat().st_mtime_ns
    shutil.copy(nifti_dir / "site2" / "s3.nii.gz", fixable)  # the file is fixed, as the warning advises
    pack_manifest(manifest, tmp_path / "pack", CFG, per_shard=2)
    volumes = PackedVolumes(tmp_path / "pack")
    assert volumes.table["subject_id"].tolist() == ["s0", "s1", "s2"] and volumes.table["offset"].tolist() == [0, 1, 0]
    for i, source in enumerate([nifti_dir / "s1.nii.gz", fixable]):  # the kept volume and the retried one
        expected = load_volume(source, CFG).numpy()
        assert np.abs(volumes[i].numpy() - expected).max() <= np.abs(expected).max() * 2.0**-11
    assert (tmp_path / "pack" / "shard-00001.npy").stat().st_mtime_ns == untouched  # nothing skipped there
    assert pack_main(_pack_argv(alone, tmp_path / "alone")) == 0  # the all-bad pack finishes too


def test_interrupt_is_one_line_and_the_rerun_resumes(tmp_path, nifti_dir, monkeypatch, capsys):
    manifest = _manifest(tmp_path / "m.csv", [str(nifti_dir / n) for n in ("s1.nii.gz", "s2.nii.gz")])
    prepare, calls = packed._prepare_one, []

    def interrupted_at_the_second(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return prepare(path)

    monkeypatch.setattr(packed, "_prepare_one", interrupted_at_the_second)
    out = tmp_path / "pack"
    assert pack_main([*_pack_argv(manifest, out), "--per-shard", "1"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "interrupted; finished shards are kept, rerun the same command to resume"
    assert sorted(p.name for p in out.iterdir()) == ["pack.json", "shard-00000.csv", "shard-00000.npy"]
    assert pack_main([*_pack_argv(manifest, out), "--per-shard", "1"]) == 0 and len(calls) == 3  # shard 0 kept
    assert len(PackedVolumes(out)) == 2


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory, nifti_dir):
    folder = tmp_path_factory.mktemp("packed")
    manifest = _manifest(folder / "m.csv", [str(nifti_dir / n) for n in ("s1.nii.gz", "s2.nii.gz")])
    pack_manifest(manifest, folder / "pack", CFG)
    return folder / "pack"


def _settings(edit):
    def apply(folder):
        record = folder / "pack.json"
        settings = json.loads(record.read_text())
        edit(settings)
        record.write_text(json.dumps(settings))

    return apply


def _index(edit):
    def apply(folder):
        table = pd.read_csv(folder / "index.csv")
        (folder / "index.csv").write_text(edit(table).to_csv(index=False))

    return apply


def _set(table, column, value):
    table[column] = table[column].astype(object)
    table.loc[0, column] = value
    return table


DAMAGE = {
    "unknown key": (_settings(lambda s: s["preprocess"].update(size=3)), "pack.json", "unknown key(s) size"),
    "missing key": (_settings(lambda s: s["preprocess"].pop("shape")), "pack.json", "preprocess has no shape"),
    "no preprocess": (_settings(lambda s: s.pop("preprocess")), "pack.json", "lacks preprocess"),
    "bad preprocess value": (_settings(lambda s: s["preprocess"].update(shape="big")), "pack.json", "is invalid"),
    "unknown dtype": (_settings(lambda s: s.update(dtype="int7")), "pack.json", "dtype 'int7' is not one of"),
    "not json": (lambda f: (f / "pack.json").write_text("{"), "pack.json", "is not valid JSON"),
    "a list": (lambda f: (f / "pack.json").write_text("[]"), "pack.json", "holds a JSON list"),
    "offset past": (_index(lambda t: _set(t, "offset", 7)), "index.csv", "offset 7 of shard-00000.npy is past"),
    "offset not a number": (_index(lambda t: _set(t, "offset", "x")), "index.csv", "row 2: offset x is not a count"),
    "negative shard": (_index(lambda t: _set(t, "shard", -1)), "index.csv", "shard -1 is not a count"),
    "no offset column": (_index(lambda t: t.drop(columns="offset")), "index.csv", "has no offset column"),
    "empty index": (_index(lambda t: t.iloc[:0]), "index.csv", "lists no volumes"),
    "empty file": (lambda f: (f / "index.csv").write_text(""), "index.csv", "cannot be read"),
    "shard missing": (lambda f: (f / "shard-00000.npy").unlink(), "shard-00000.npy", "does not exist"),
    "shard not npy": (lambda f: (f / "shard-00000.npy").write_text("x"), "shard-00000.npy", "cannot be read as .npy"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_pack_is_a_data_error_naming_the_file(tmp_path, pack_dir, case):
    damage, name, message = DAMAGE[case]
    folder = tmp_path / "pack"
    shutil.copytree(pack_dir, folder)
    damage(folder)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
        PackedVolumes(folder)
    assert raised.value.path.name == name


def test_training_on_a_damaged_pack_is_one_error_line(tmp_path, pack_dir, capsys):
    folder = tmp_path / "pack"
    shutil.copytree(pack_dir, folder)
    (folder / "index.csv").write_text("path,subject_id,shard,offset\n")  # empty: was a ZeroDivisionError
    run = tiny_config(data={"num_workers": 0, "packed": {"directory": str(folder)}}, train={"steps": 1})
    args = ["--corpus", "packed", "--config", write_yaml(tmp_path / "c.yaml", run), "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "index.csv: lists no volumes" in err


def test_rerun_over_a_damaged_pack_json_is_one_error_line(tmp_path, pack_dir, nifti_dir, capsys):
    folder = tmp_path / "pack"
    shutil.copytree(pack_dir, folder)
    (folder / "pack.json").write_text("{")
    manifest = _manifest(tmp_path / "m.csv", [str(nifti_dir / "s1.nii.gz")])
    assert pack_main(_pack_argv(manifest, folder)) == 2
    assert capsys.readouterr().err.startswith(f"error: {folder / 'pack.json'}: is not valid JSON")
