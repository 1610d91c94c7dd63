"""Split one generation job into N disjoint index ranges (a cluster job array) and join their manifests.

Shard ``K/N`` (K = 1 .. N) makes subjects ``(K-1)·n//N .. K·n//N - 1`` into the same folder as every other
shard and writes ``manifest.shard-K-of-N.csv``; ``merge`` checks that all N shard manifests are there and
cover ``0 .. n-1`` once, and joins them into ``manifest.csv``. A subject's volume depends only on (seed,
index), and each shard's rows are formatted as the unsharded run formats them, so the union of the shards is
byte-identical to ``python -m synth`` without ``--shard`` (tested).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.errors import ConfigError, DataError
from common.io import atomic_write

SHARD_MANIFEST = re.compile(r"manifest\.shard-(\d+)-of-(\d+)\.csv")


@dataclass(frozen=True)
class Shard:
    """Shard ``k`` (1-based) of ``count``."""

    k: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"K/N"`` with 1 <= K <= N; ConfigError otherwise."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if match is None:
            raise ConfigError(f"--shard must be K/N (e.g. 3/8), got {text!r}")
        k, count = int(match[1]), int(match[2])
        if count < 1 or not 1 <= k <= count:
            raise ConfigError(
                f"--shard {text}: K must be between 1 and N (a job array numbered from 0 passes "
                f"$((SLURM_ARRAY_TASK_ID + 1))/N)"
            )
        return cls(k, count)

    def indices(self, n: int) -> range:
        """This shard's contiguous part of ``0 .. n-1`` (sizes differ by at most one)."""
        return range((self.k - 1) * n // self.count, self.k * n // self.count)

    @property
    def manifest_name(self) -> str:
        return f"manifest.shard-{self.k}-of-{self.count}.csv"


def shard_manifests(out: Path) -> dict[int, dict[int, Path]]:
    """The shard manifests in ``out``: ``{N: {K: path}}``."""
    found: dict[int, dict[int, Path]] = {}
    for path in sorted(out.glob("manifest.shard-*-of-*.csv")):
        match = SHARD_MANIFEST.fullmatch(path.name)
        if match:
            found.setdefault(int(match[2]), {})[int(match[1])] = path
    return found


def merge(out: str | Path) -> Path:
    """Join ``out``'s shard manifests into ``out/manifest.csv`` (atomically); DataError naming what is missing."""
    out = Path(out).expanduser()
    if not out.is_dir():
        raise DataError(out, "is not a folder written by `python -m synth ... --shard K/N`")
    found = shard_manifests(out)
    if not found:
        raise DataError(out, "holds no shard manifests (manifest.shard-K-of-N.csv); run the shards first")
    if len(found) > 1:
        raise DataError(
            out,
            f"holds shard manifests of several shard counts ({', '.join(f'N={c}' for c in sorted(found))}); "
            "remove the ones of the count you no longer use",
        )
    count, shards = next(iter(found.items()))
    missing = [k for k in range(1, count + 1) if k not in shards]
    if missing:
        raise DataError(
            out, f"shards {', '.join(f'{k}/{count}' for k in missing)} have not finished (no manifest); run them"
        )
    header, lines, indices = None, [], []
    for k in range(1, count + 1):
        path = shards[k]
        text = path.read_text()
        head, _, body = text.partition("\n")
        if header is None:
            header = head
        elif head != header:
            raise DataError(path, "has other columns than shard 1; the shards were made with different settings")
        lines.append(body)
        indices += pd.read_csv(path, usecols=["index"])["index"].tolist()
    n = len(indices)
    if indices != list(range(n)):
        raise DataError(out, f"the shard manifests do not cover subjects 0 .. {n - 1} once each, in order")
    for k in range(1, count + 1):  # each shard holds exactly its range of n: no shard was run with another --n
        rows = sum(1 for line in lines[k - 1].splitlines() if line)
        if rows != len(Shard(k, count).indices(n)):
            raise DataError(
                shards[k],
                f"holds {rows} subjects, shard {k}/{count} of {n} should hold "
                f"{len(Shard(k, count).indices(n))}; was it run with another --n?",
            )
    manifest = out / "manifest.csv"
    with atomic_write(manifest) as tmp:
        tmp.write_text(header + "\n" + "".join(lines))
    return manifest
