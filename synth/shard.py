"""Split one generation job into N disjoint index ranges (a cluster job array) and join their manifests.

Shard ``K/N`` (K = 1 .. N) makes subjects ``(K-1)·n//N .. K·n//N - 1`` into the same folder as every other
shard and writes ``manifest.shard-K-of-N.csv`` and, beside it, the settings it was made with
(``manifest.shard-K-of-N.json``: ``n``, job with its renderings per subject, full config); ``merge`` checks
that all N shard manifests are there, were made with one set of settings (each other's and the folder's
``synth.yaml``) and cover ``0 .. n-1`` once (each subject's renderings in order), and joins them into
``manifest.csv``. A subject's volume depends only on (seed,
index), and each shard's rows are formatted as the unsharded run formats them, so the union of the shards is
byte-identical to ``python -m synth`` without ``--shard`` (tested).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

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

    @property
    def settings_name(self) -> str:
        return f"manifest.shard-{self.k}-of-{self.count}.json"


def differences(a: object, b: object, key: str = "", was: str = "before", now: str = "now") -> list[str]:
    """``"key.path: a <was>, b <now>"`` for every leaf where two nested settings dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in differences(a.get(k), b.get(k), f"{key}.{k}".strip("."), was, now)]
    return [] if a == b else [f"{key}: {a!r} {was}, {b!r} {now}"]


def write_settings(out: Path, shard: Shard, n: int, settings: dict) -> None:
    """Record beside the shard's manifest what it was made with (``n``, job, config); ``merge`` compares them."""
    record = {"shard": f"{shard.k}/{shard.count}", "n": n, **settings}
    with atomic_write(out / shard.settings_name) as tmp:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def _read_settings(out: Path, shard: Shard) -> dict:
    path = out / shard.settings_name
    if not path.is_file():
        raise DataError(
            path,
            f"is missing, so shard {shard.k}/{shard.count}'s settings are unknown (made by an older version, or its "
            "manifest was copied without it); rerun that shard's command (finished subjects are kept)",
        )
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"cannot be read as JSON ({e}); rerun shard {shard.k}/{shard.count}'s command") from None
    if not isinstance(record, dict) or record.get("shard") != f"{shard.k}/{shard.count}":
        raise DataError(path, f"is not shard {shard.k}/{shard.count}'s settings record; rerun that shard's command")
    return record


def _check_settings(out: Path, count: int) -> dict:
    """Shard 1's settings, after checking every shard was made with them and with the folder's synth.yaml."""
    records = {k: _read_settings(out, Shard(k, count)) for k in range(1, count + 1)}
    first = {key: value for key, value in records[1].items() if key != "shard"}
    folder = out / "synth.yaml"
    if folder.is_file():
        try:
            made = yaml.safe_load(folder.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise DataError(folder, f"cannot be read ({e})") from None
        changed = differences(made, {key: first.get(key) for key in ("job", "config")}, was="in synth.yaml", now="here")
        if changed:
            raise DataError(
                out / Shard(1, count).settings_name,
                f"shard 1/{count} was made with other settings than the folder's synth.yaml "
                f"({'; '.join(changed[:3])}); remake it with the folder's settings",
            )
    for k in range(2, count + 1):
        record = {key: value for key, value in records[k].items() if key != "shard"}
        changed = differences(first, record, was=f"in shard 1/{count}", now="here")
        if changed:
            raise DataError(
                out / Shard(k, count).settings_name,
                f"shard {k}/{count} was made with other settings than shard 1/{count} ({'; '.join(changed[:3])}); "
                "merging would mix two corpora: remake it with shard 1's settings",
            )
    return first


def _check_rows(path: Path, rows: pd.DataFrame, settings: dict) -> None:
    # the rows themselves: a shard manifest copied in without its settings record
    job, config = settings.get("job"), settings.get("config")
    expected = {
        "seed": job.get("seed") if isinstance(job, dict) else None,
        "spacing": config.get("spacing") if isinstance(config, dict) else None,
    }
    for column, value in expected.items():
        if column in rows and value is not None and not (rows[column] == value).all():
            other = sorted(set(rows[column].tolist()) - {value})[:3]
            raise DataError(
                path,
                f"holds rows with {column} {', '.join(map(str, other))}, but the shards were made with {column} "
                f"{value}; remake this shard with the same command as the others",
            )


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
    settings = _check_settings(out, count)
    job = settings.get("job")
    renderings = int(job.get("renderings", 1)) if isinstance(job, dict) else 1
    header, lines, volumes = None, [], []
    for k in range(1, count + 1):
        path = shards[k]
        text = path.read_text()
        head, _, body = text.partition("\n")
        if header is None:
            header = head
        elif head != header:
            raise DataError(path, "has other columns than shard 1; the shards were made with different settings")
        lines.append(body)
        try:
            rows = pd.read_csv(path)
            rendering = rows["rendering"].tolist() if "rendering" in rows else [0] * len(rows)  # older: 1 each
            volumes += list(zip(rows["index"].tolist(), rendering))
        except (ValueError, KeyError) as e:  # pandas' parser errors are ValueErrors
            problem = f"is not a shard manifest ({type(e).__name__}: {e}); rerun shard {k}/{count}"
            raise DataError(path, problem) from None
        _check_rows(path, rows, settings)
    n = len(volumes) // renderings
    if volumes != [(i, r) for i in range(n) for r in range(renderings)]:
        raise DataError(
            out,
            f"the shard manifests do not cover subjects 0 .. {n - 1} once each ({renderings} rendering(s) each), "
            "in order",
        )
    for k in range(1, count + 1):  # each shard holds exactly its range of n: no shard was run with another --n
        rows = sum(1 for line in lines[k - 1].splitlines() if line)
        if rows != renderings * len(Shard(k, count).indices(n)):
            raise DataError(
                shards[k],
                f"holds {rows // renderings} subjects, shard {k}/{count} of {n} should hold "
                f"{len(Shard(k, count).indices(n))}; was it run with another --n?",
            )
    manifest = out / "manifest.csv"
    with atomic_write(manifest) as tmp:
        tmp.write_text(header + "\n" + "".join(lines))
    return manifest
