"""Packed shards: a manifest's volumes preprocessed once to the model's input and stored as fixed-shape NumPy
arrays, read back memory-mapped (no decompression, no resampling: near-zero CPU per volume).

Folder layout (``pack_manifest`` writes it, ``PackedVolumes`` reads it)::

    pack.json             format, preprocessing (PreprocessConfig.describe()), dtype, shard size, source + hash
    shard-00000.npy       (n, 1, D, H, W) uint8 or float16 (NumPy's .npy: np.load(mmap_mode="r"))
    shard-00000.csv       the shard's manifest rows + ``shard``, ``offset`` (-1 and ``error`` for a skipped file)
    index.csv             all packed rows (``shard``, ``offset`` say where each volume is), written at the end

Quantisation: ``float16`` keeps any intensity (relative error <= 2**-11, e.g. z-scores to ~0.002);
``uint8`` stores ``round(x * 255)`` for volumes in [0, 1] (``percentile`` normalisation, or ``none`` for synth's
output), absolute error <= 0.5 / 255. A shard is finished when its ``.csv`` exists (written after the
``.npy``, both atomically), so a rerun with the same settings resumes; other settings are refused. A rerun
also retries every image an earlier run skipped (e.g. after the file was fixed) and rewrites the shards where
one now packs. ``PackedVolumes`` checks ``pack.json``, ``index.csv`` and the shards' headers when it opens a
folder, so a damaged pack is a ``DataError`` naming the file, not a failure at some later item.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.data.manifest import read_manifest
from common.data.volume import PreprocessConfig, build_preprocess
from common.errors import ConfigError, DataError
from common.io import atomic_write, file_hash

log = logging.getLogger(__name__)

FORMAT = "neurotransfer-packed-v1"
PACK_DTYPES = ("float16", "uint8")
UINT8_SCALE = 255.0
UINT8_RANGE_TOLERANCE = 1e-5  # [0, 1] volumes may overshoot by float rounding in resampling
FLOAT16_MAX = 65504.0


def _shard_name(shard: int, suffix: str) -> str:
    return f"shard-{shard:05d}.{suffix}"


def quantise(volume: np.ndarray, dtype: str, source: str) -> np.ndarray:
    """``(1, D, H, W)`` float32 -> the packed dtype; DataError naming ``source`` if it does not fit."""
    if dtype == "uint8":
        lo, hi = float(volume.min()), float(volume.max())
        if lo < -UINT8_RANGE_TOLERANCE or hi > 1 + UINT8_RANGE_TOLERANCE:
            raise DataError(
                source,
                f"has values in [{lo:.4g}, {hi:.4g}], outside [0, 1]; uint8 packing needs [0, 1] "
                "(intensity percentile, or none for synth volumes) - pack with --dtype float16",
            )
        return np.rint(np.clip(volume, 0.0, 1.0) * UINT8_SCALE).astype(np.uint8)
    peak = float(np.abs(volume).max())
    if peak > FLOAT16_MAX:
        raise DataError(source, f"has |values| up to {peak:.4g}, beyond float16's {FLOAT16_MAX:g}; normalise it")
    return volume.astype(np.float16)


def dequantise(packed: np.ndarray) -> torch.Tensor:
    """Packed array -> float32 tensor (the inverse of ``quantise`` up to its rounding)."""
    tensor = torch.from_numpy(packed.astype(np.float32))  # one copy out of the (read-only) mapping
    return tensor.div_(UINT8_SCALE) if packed.dtype == np.uint8 else tensor


# ---- writing ---------------------------------------------------------------------------------------------
_WORKER: dict[str, object] = {}


def _init_worker(cfg: PreprocessConfig, dtype: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(preprocess=build_preprocess(cfg), dtype=dtype)


def _init_pool_worker(cfg: PreprocessConfig, dtype: str, threads: int) -> None:
    # Ctrl-C reaches the whole process group: the main process stops the pool and reports it in one line, so
    # workers must not each print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(cfg, dtype, threads)


def _prepare_one(path: str) -> np.ndarray | str:
    """The packed volume, or the reason it could not be made (a bad file is skipped, not fatal)."""
    try:
        volume = _WORKER["preprocess"]({"image": path})["image"].numpy()  # (1, D, H, W) float32
        return quantise(volume, _WORKER["dtype"], path)
    except DataError as e:
        return str(e)


def _settings(manifest: Path, cfg: PreprocessConfig, dtype: str, per_shard: int, count: int) -> dict:
    settings = {
        "format": FORMAT,
        "preprocess": asdict(cfg),
        "dtype": dtype,
        "per_shard": per_shard,
        "count": count,
        "source": str(manifest.resolve()),
        "source_hash": file_hash(manifest),
    }
    return json.loads(json.dumps(settings))  # tuples -> lists: compares equal to what pack.json reads back


def _check(out: Path, settings: dict, cfg: PreprocessConfig, dtype: str, per_shard: int) -> None:
    if dtype not in PACK_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(PACK_DTYPES)}, got {dtype!r}")
    if dtype == "uint8" and cfg.intensity == "zscore":
        raise ConfigError(
            "uint8 packing stores [0, 1]; z-scored volumes are not in it: use --dtype float16 or --intensity percentile"
        )
    if per_shard < 1:
        raise ConfigError(f"--per-shard must be >= 1, got {per_shard}")
    if out.exists() and not out.is_dir():
        raise DataError(out, "the output path is a file, not a folder; give a folder with --out")
    record = out / "pack.json"
    if record.is_file():
        before = _read_json(record)
        # "source" (where the manifest lies) may move; its hash may not change
        changed = [k for k in sorted((set(before) | set(settings)) - {"source"}) if before.get(k) != settings.get(k)]
        if changed:
            raise ConfigError(
                f"{out} was packed with other settings or another manifest ({', '.join(changed)} "
                "differ); resume with the same ones or choose another --out"
            )


def _shard_rows(rows: pd.DataFrame, shard: int, results: Sequence[np.ndarray | str]) -> pd.DataFrame:
    table = rows.copy()
    offsets, errors, k = [], [], 0
    for result in results:
        good = isinstance(result, np.ndarray)
        offsets.append(k if good else -1)
        errors.append("" if good else result)
        k += good
    table["shard"], table["offset"], table["error"] = shard, offsets, errors
    return table


def _results(paths: list[str], workers: int, pool: ProcessPoolExecutor | None) -> Iterator[np.ndarray | str]:
    if pool is None:
        return map(_prepare_one, paths)
    return pool.map(_prepare_one, paths, chunksize=max(1, len(paths) // (4 * workers)))


def _write_shard(out: Path, shard: int, rows: pd.DataFrame, results: list, cfg: PreprocessConfig, dtype: str) -> None:
    """The shard's ``.npy`` then its ``.csv`` (the mark that it is finished), both atomically."""
    for path, result in zip(rows["path"], results):
        if not isinstance(result, np.ndarray):
            log.warning("skipped %s: %s", path, result)
    good = [r for r in results if isinstance(r, np.ndarray)]
    empty = np.zeros((0, 1, *cfg.shape), dtype=np.dtype(dtype))
    with atomic_write(out / _shard_name(shard, "npy")) as tmp:
        np.save(tmp, np.stack(good) if good else empty)
    with atomic_write(out / _shard_name(shard, "csv")) as tmp:
        _shard_rows(rows, shard, results).to_csv(tmp, index=False)


def _read_shard_rows(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype={"path": str, "subject_id": str})
        offsets = table["offset"].astype(int)
    except (ValueError, KeyError, TypeError) as e:  # pandas' parser errors are ValueErrors
        raise DataError(path, f"is not a packed shard's table ({type(e).__name__}: {e}); delete it to repack") from None
    table["offset"] = offsets
    return table


def _retry_skipped(
    out: Path,
    shard: int,
    rows: pd.DataFrame,
    workers: int,
    pool: ProcessPoolExecutor | None,
    cfg: PreprocessConfig,
    dtype: str,
) -> None:
    """Pack again the images a finished shard skipped; rewrite the shard if any of them packs now."""
    done = out / _shard_name(shard, "csv")
    previous = _read_shard_rows(done)
    if len(previous) != len(rows):  # paths may differ: a moved manifest resolves its relative paths anew
        raise DataError(
            done, f"lists {len(previous)} rows, the manifest gives this shard {len(rows)}; delete it to repack"
        )
    skipped = np.flatnonzero(previous["offset"].to_numpy() < 0)
    if not len(skipped):
        return
    retried = list(_results(rows["path"].iloc[skipped].tolist(), workers, pool))
    if not any(isinstance(r, np.ndarray) for r in retried):
        for path, result in zip(rows["path"].iloc[skipped], retried):
            log.warning("skipped %s again: %s", path, result)
        return  # still failing: the shard stays as it is
    stored = np.load(out / _shard_name(shard, "npy"), mmap_mode="r")
    if previous["offset"].max() >= len(stored):
        raise DataError(
            done, f"points past the {len(stored)} volumes of {_shard_name(shard, 'npy')}; delete it to repack"
        )
    results: list[np.ndarray | str] = [stored[k] if k >= 0 else "" for k in previous["offset"]]
    for position, result in zip(skipped, retried):
        results[position] = result
    packs = sum(isinstance(r, np.ndarray) for r in retried)
    log.info("%s: %d of the %d images skipped before pack now", _shard_name(shard, "npy"), packs, len(skipped))
    done.unlink()  # unfinished until rewritten: a run killed in between repacks the shard from scratch
    _write_shard(out, shard, rows, results, cfg, dtype)


def pack_manifest(
    manifest: str | Path,
    out: str | Path,
    cfg: PreprocessConfig,
    dtype: str = "float16",
    per_shard: int = 256,
    workers: int = 1,
) -> Path:
    """Pack ``manifest``'s images, preprocessed by ``cfg``, into ``out``; returns ``out/index.csv``.

    Unreadable or invalid images are skipped and logged (``error`` in the shard's CSV); resumable."""
    manifest = Path(manifest).expanduser()
    table = read_manifest(manifest, required=("path",), check_files=False)
    out = Path(out).expanduser()
    settings = _settings(manifest, cfg, dtype, per_shard, len(table))
    _check(out, settings, cfg, dtype, per_shard)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".tmp-*"):  # a killed run's temporary files, never outputs
        stale.unlink(missing_ok=True)
    if not (out / "pack.json").is_file():
        with atomic_write(out / "pack.json") as tmp:
            tmp.write_text(json.dumps(settings, indent=2))
    shards = range((len(table) + per_shard - 1) // per_shard)
    pool = None
    if workers > 1:
        pool = ProcessPoolExecutor(workers, initializer=_init_pool_worker, initargs=(cfg, dtype, 1))
    else:
        _init_worker(cfg, dtype, torch.get_num_threads())
    try:
        for shard in shards:
            rows = table.iloc[shard * per_shard : (shard + 1) * per_shard]
            if (out / _shard_name(shard, "csv")).is_file():  # finished by an earlier run: retry what it skipped
                _retry_skipped(out, shard, rows, workers, pool, cfg, dtype)
                continue
            _write_shard(out, shard, rows, list(_results(rows["path"].tolist(), workers, pool)), cfg, dtype)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    index = pd.concat([_read_shard_rows(out / _shard_name(s, "csv")) for s in shards], ignore_index=True)
    skipped = int((index["offset"] < 0).sum())
    if skipped == len(index):
        raise DataError(
            manifest,
            "no image could be packed (every one was skipped; see the warnings): fix the files and rerun the "
            "same command (skipped images are retried)",
        )
    with atomic_write(out / "index.csv") as tmp:
        index[index["offset"] >= 0].drop(columns="error").to_csv(tmp, index=False)
    if skipped:
        log.warning(
            "%d of %d images were skipped (listed with their error in %s/shard-*.csv); fix them and rerun the same "
            "command to pack them",
            skipped,
            len(index),
            out,
        )
    return out / "index.csv"


# ---- reading ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"is not valid JSON ({e}); pack again into a new folder") from None
    if not isinstance(record, dict):
        raise DataError(path, f"holds a JSON {type(record).__name__}, not the pack's settings; pack again")
    return record


def _check_settings(record: Path, settings: dict) -> PreprocessConfig:
    """The pack's preprocessing from ``pack.json``, every field present and known; DataError otherwise."""
    if settings.get("format") != FORMAT:
        raise DataError(record, f"format {settings.get('format')!r} is not {FORMAT!r}")
    missing = [k for k in ("preprocess", "dtype", "source_hash") if k not in settings]
    if missing:
        raise DataError(record, f"lacks {', '.join(missing)}; pack again into a new folder")
    if settings["dtype"] not in PACK_DTYPES:
        raise DataError(record, f"dtype {settings['dtype']!r} is not one of {', '.join(PACK_DTYPES)}")
    preprocess = settings["preprocess"]
    if not isinstance(preprocess, dict):
        raise DataError(record, f"preprocess must be a mapping of PreprocessConfig fields, got {preprocess!r}")
    names = {f.name for f in fields(PreprocessConfig)}
    unknown, missing = sorted(set(preprocess) - names), sorted(names - set(preprocess))
    if unknown or missing:  # a default filled in for a missing key would misdescribe the packed volumes
        what = [f"unknown key(s) {', '.join(unknown)}"] * bool(unknown) + [f"no {', '.join(missing)}"] * bool(missing)
        raise DataError(record, f"preprocess has {' and '.join(what)}; pack again into a new folder")
    try:
        return PreprocessConfig(**preprocess)
    except (ConfigError, TypeError, ValueError) as e:
        raise DataError(record, f"preprocess is invalid: {e}") from None


def _shard_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of a ``.npy`` (mapping it reads only the header; the map is dropped again)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot be read as .npy ({e}); rerun the pack command") from None
    return array.shape, array.dtype


class PackedVolumes:
    """Map-style access to a packed folder: ``len``, ``[i]`` -> ``(1, D, H, W)`` float32 tensor, ``crop``.

    Opening checks ``pack.json``, ``index.csv`` and every shard's header (shape, dtype, length against the
    offsets); shards are memory-mapped on first use in each process (forked DataLoader workers map their own)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        record, index = self.directory / "pack.json", self.directory / "index.csv"
        if not record.is_file():
            raise DataError(record, "does not exist: is this a folder written by `python -m pretrain.pack`?")
        if not index.is_file():
            raise DataError(index, "does not exist: the packing did not finish; rerun the same pack command")
        self.settings = _read_json(record)
        self.preprocess = _check_settings(record, self.settings)
        self.shape = (1, *self.preprocess.shape)
        self.table = self._read_index(index)
        self._shard = self.table["shard"].to_numpy()
        self._offset = self.table["offset"].to_numpy()
        self._maps: dict[int, np.ndarray] = {}

    def _read_index(self, index: Path) -> pd.DataFrame:
        try:
            table = pd.read_csv(index, dtype={"path": str, "subject_id": str})
        except (ValueError, OSError) as e:  # an empty file is pandas' EmptyDataError, a ValueError
            raise DataError(index, f"cannot be read ({e}); rerun the same pack command") from None
        missing = [c for c in ("shard", "offset") if c not in table]
        if missing:
            raise DataError(index, f"has no {' or '.join(missing)} column; rerun the same pack command")
        if table.empty:
            raise DataError(index, "lists no volumes; pack a manifest with readable images")
        for column in ("shard", "offset"):
            values = pd.to_numeric(table[column], errors="coerce")
            if values.isna().any() or (values < 0).any() or (values != values.round()).any():
                row = int(np.flatnonzero((values.isna() | (values < 0) | (values != values.round())).to_numpy())[0])
                raise DataError(index, f"row {row + 2}: {column} {table[column].iloc[row]} is not a count >= 0")
            table[column] = values.astype(np.int64)
        for shard, offsets in table.groupby("shard")["offset"]:
            path = self.directory / _shard_name(int(shard), "npy")
            if not path.is_file():
                raise DataError(path, f"does not exist but {index.name} lists volumes in it; rerun the pack command")
            shape, dtype = _shard_header(path)
            if shape[1:] != self.shape or str(dtype) != self.settings["dtype"]:
                raise DataError(
                    path, f"holds {dtype} {shape[1:]}, pack.json says {self.settings['dtype']} {self.shape}"
                )
            if int(offsets.max()) >= shape[0]:
                raise DataError(
                    index, f"offset {int(offsets.max())} of {path.name} is past its {shape[0]} volumes; rerun the pack"
                )
        return table

    def __len__(self) -> int:
        return len(self.table)

    def _array(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            path = self.directory / _shard_name(shard, "npy")
            try:
                self._maps[shard] = np.load(path, mmap_mode="r")  # header checked when the folder was opened
            except (OSError, ValueError) as e:
                raise DataError(path, f"cannot be memory-mapped as .npy ({e})") from None
        return self._maps[shard]

    def packed(self, i: int) -> np.ndarray:
        """Volume ``i`` as stored (a memory-mapped view, no copy)."""
        return self._array(int(self._shard[i]))[int(self._offset[i])]

    def __getitem__(self, i: int) -> torch.Tensor:
        return dequantise(self.packed(i))

    def crop(self, i: int, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
        """``(1, *size)`` float32 from ``start``: only the cropped bytes are read from the mapping."""
        region = tuple(slice(int(a), int(a) + int(s)) for a, s in zip(start, size))
        return dequantise(self.packed(i)[(slice(None), *region)])
