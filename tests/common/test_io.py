"""common.io: atomic writes, file hashing and pickle-free reading of torch files."""

import hashlib
import os

import pytest
import torch

from common.errors import CheckpointError, DataError
from common.io import atomic_write, atomic_write_text, file_hash, load_torch_file


def test_atomic_write_replaces_on_success_and_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "sub" / "vol.nii.gz"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith("vol.nii.gz") and tmp != target
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first"

    with pytest.raises(RuntimeError, match="boom"), atomic_write(target) as tmp:
        tmp.write_bytes(b"half-written")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"first"
    assert os.listdir(target.parent) == ["vol.nii.gz"]  # no temp file left behind


def test_load_torch_file_plain_state_dict(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"layer.weight": torch.ones(2, 3), "step": 3}, path)
    state = load_torch_file(path)
    assert state["step"] == 3
    torch.testing.assert_close(state["layer.weight"], torch.ones(2, 3))


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): proof that a loader ran code from the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_load_torch_file_refuses_pickle_and_runs_nothing(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        load_torch_file(path)
    msg = str(err.value)
    assert str(path) in msg and "needs full pickle" in msg and "refused" in msg
    assert "posix.mkdir" in msg or "os.mkdir" in msg
    assert not marker.exists()

    garbage = tmp_path / "garbage.pt"
    garbage.write_text("hello")
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable torch checkpoint"):
        load_torch_file(garbage)


def test_file_hash_is_sha256_of_bytes(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("path,subject_id\na.nii.gz,1\n")
    assert file_hash(csv) == hashlib.sha256(csv.read_bytes()).hexdigest()
    before = file_hash(csv)
    csv.write_text("path,subject_id\na.nii.gz,2\n")
    assert file_hash(csv) != before
    with pytest.raises(DataError, match="absent.csv: cannot hash the file, it does not exist"):
        file_hash(tmp_path / "absent.csv")
    assert file_hash(csv, "sha1") == hashlib.sha1(csv.read_bytes()).hexdigest()


def test_atomic_write_text_and_an_empty_write_is_an_error(tmp_path):
    target = atomic_write_text(tmp_path / "a" / "config.yaml", "x: 1\n")
    assert target.read_text() == "x: 1\n"
    with pytest.raises(DataError, match="nothing was written"), atomic_write(tmp_path / "empty.txt"):
        pass
    assert not (tmp_path / "empty.txt").exists()
