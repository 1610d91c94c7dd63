"""File input/output every package shares: atomic writes (fsync, then rename), file hashing, and pickle-free
reading of ``.pt`` files. Depends on nothing in the project but ``common.errors``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from common.errors import CheckpointError, DataError

RESAVE_HINT = "Re-save it as a plain state dict of tensors (torch.save(model.state_dict(), ...)) or as safetensors."


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    The temporary name ends with the target's own name, so writers that pick a format from the suffix
    (``.nii.gz``, ``.safetensors``) behave as for the target. The file gets the mode a plain ``open`` gives
    (``0o666`` less the user's umask), whatever the writer chose: safetensors writes ``0o600``, which would keep
    an export from the rest of a group that shares it. On an exception the temporary file is removed and an
    existing ``path`` is left untouched. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        yield tmp
        if not tmp.is_file():
            raise DataError(path, f"atomic write: nothing was written to the temporary file {tmp}")
        os.chmod(tmp, 0o666 & ~umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def umask() -> int:
    """The process's file-creation mask, read without changing it where Linux reports it (``os.umask`` can only
    be read by setting it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a reader never sees half a file)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable; skipped where the OS or filesystem cannot."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_hash(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (provenance of a manifest; identical images under two subject IDs)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "cannot hash the file, it does not exist")
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_torch_file(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    allow: Sequence[Any] = (),
    hint: str = RESAVE_HINT,
) -> Any:
    """Read a ``.pt``/``.pth`` file with ``torch.load(weights_only=True)``; ``allow``: extra plain types
    (classes, enums) the unpickler may build.

    A file that needs full pickle (custom classes, numpy arrays, ...) is refused with a ``CheckpointError``:
    unpickling can run arbitrary code, so the project never does it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"\bGLOBAL ([\w.]+)", str(e))
        what = f" (it contains {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: this file needs full pickle to load{what} and is refused, because unpickling can run "
            f"arbitrary code. {hint}"
        ) from e
    except Exception as e:  # a truncated zip, a text file, ...
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
