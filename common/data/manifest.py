"""The manifest: a CSV (or, by extension, a tab-separated ``.tsv``), one row per image (``path, subject_id,
session_id, site, dataset, age, sex, diagnosis``).

A task names the columns it needs; unknown columns pass through. Relative paths are relative to the CSV's
folder. An image is one row: its path, and its subject and session, told apart from the session's other images by
the BIDS entity columns ``acq``, ``rec``, ``run`` (``space``, ``desc`` for derivatives) where the manifest has them.
Errors name the CSV and the column and CSV line numbers (line 1 is the header) of the offending rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from common.errors import DataError

MANIFEST_COLUMNS = ("path", "subject_id", "session_id", "site", "dataset", "age", "sex", "diagnosis")
# BIDS entities that tell apart the images of one session (two runs, two acquisitions); columns where present
IMAGE_ENTITIES = ("acq", "rec", "run", "space", "desc")
# Identifiers and categories are text even when they look like numbers ("007" and run "01" stay as written).
TEXT_COLUMNS = ("path", "subject_id", "session_id", "site", "dataset", "sex", "diagnosis", *IMAGE_ENTITIES)
_SHOWN = 5  # offending rows listed in a message before "..."


def _lines(rows: Iterable[int]) -> str:
    """CSV line numbers of DataFrame row positions (header is line 1), the first few."""
    rows = list(rows)
    shown = ", ".join(str(r + 2) for r in rows[:_SHOWN])
    more = ", ..." if len(rows) > _SHOWN else ""
    return f"line{'s' if len(rows) > 1 else ''} {shown}{more} ({len(rows)} row{'s' if len(rows) > 1 else ''})"


def separator(path: str | Path) -> str:
    """The manifest's field separator, by its extension: a tab for ``.tsv``, else a comma."""
    return "\t" if Path(path).suffix.lower() == ".tsv" else ","


def read_manifest(
    path: str | Path,
    required: Sequence[str] = ("path", "subject_id"),
    diagnoses: Iterable[str] | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """Read and validate a manifest CSV (``.tsv``: tab-separated); returns one row per image with ``path`` absolute.

    ``required``: columns that must exist with no empty cell. ``diagnoses``: the allowed ``diagnosis`` values
    (any other value, or an empty one, is an error). ``check_files``: every ``path`` must exist.
    ``age`` is numeric (float); the text columns are strings. Raises ``DataError`` naming the CSV and rows.
    """
    csv = Path(path).expanduser()
    if not csv.is_file():
        raise DataError(csv, "manifest file does not exist")
    sep = separator(csv)
    present = _header(csv, sep)
    try:
        df = pd.read_csv(csv, sep=sep, dtype={c: str for c in TEXT_COLUMNS if c in present}, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise DataError(csv, f"cannot be parsed as CSV ({e})") from e
    if len(df) == 0:
        raise DataError(csv, "manifest has no rows")
    for col in df.columns.intersection(TEXT_COLUMNS):
        df[col] = df[col].str.strip().replace("", pd.NA)

    required = tuple(dict.fromkeys(("path", *required)))  # an image manifest always needs its paths
    missing = [c for c in required if c not in df.columns]
    if missing:
        # participants.tsv lists subjects, not images: name the command that turns a BIDS folder into a manifest
        bids = "; a BIDS participants.tsv is not a manifest: `python -m finetune manifest --bids ROOT` writes one"
        raise DataError(
            csv,
            f"missing column(s) {', '.join(missing)}; the columns present are {', '.join(map(str, df.columns))}"
            + (bids if csv.name == "participants.tsv" else ""),
        )
    for col in required:
        empty = df.index[df[col].isna()]
        if len(empty):
            raise DataError(csv, f"column {col!r} is empty on {_lines(empty)}")

    if "age" in df.columns:
        df["age"] = _numeric(df["age"], csv, "age")
    if diagnoses is not None:
        _check_diagnoses(df, csv, diagnoses)

    df["path"] = [str(_resolve(p, csv.parent)) for p in df["path"]]
    _check_duplicates(df, csv)
    if check_files:
        absent = df.index[[not Path(p).is_file() for p in df["path"]]]
        if len(absent):
            raise DataError(csv, f"image file(s) not found on {_lines(absent)}, e.g. {df['path'][absent[0]]}")
    return df.reset_index(drop=True)


def _header(csv: Path, sep: str) -> list[str]:
    try:
        return [c.strip() for c in pd.read_csv(csv, sep=sep, nrows=0).columns]
    except pd.errors.EmptyDataError as e:
        raise DataError(csv, "manifest is empty (no header line)") from e
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise DataError(csv, f"cannot be parsed as CSV ({e})") from e


def _numeric(values: pd.Series, csv: Path, column: str) -> pd.Series:
    converted = pd.to_numeric(values, errors="coerce")
    bad = values.index[converted.isna() & values.notna()]
    if len(bad):
        raise DataError(csv, f"column {column!r} must be numeric: {values[bad[0]]!r} on {_lines(bad)}")
    return converted.astype("float64")


def _check_diagnoses(df: pd.DataFrame, csv: Path, diagnoses: Iterable[str]) -> None:
    allowed = {str(d) for d in diagnoses}
    if "diagnosis" not in df.columns:
        raise DataError(csv, f"missing column 'diagnosis' (expected values {sorted(allowed)})")
    unknown = df.index[~df["diagnosis"].isin(allowed)]
    if len(unknown):
        values = sorted({str(v) for v in df["diagnosis"][unknown]})
        raise DataError(
            csv, f"unknown diagnosis value(s) {values} on {_lines(unknown)}; expected one of {sorted(allowed)}"
        )


def _resolve(value: str, folder: Path) -> Path:
    p = Path(value).expanduser()
    return (p if p.is_absolute() else folder / p).resolve()


def _check_duplicates(df: pd.DataFrame, csv: Path) -> None:
    """Raise ``DataError`` naming ``csv`` if two rows share a path, or a subject, session and the image entities
    present (``IMAGE_ENTITIES``: two runs of a session are two images only where a ``run`` column says so)."""
    dup = df.index[df.duplicated("path", keep=False)]
    if len(dup):
        raise DataError(csv, f"duplicate rows: the same path {df['path'][dup[0]]} on {_lines(dup)}")
    if {"subject_id", "session_id"} <= set(df.columns):
        entities = [c for c in IMAGE_ENTITIES if c in df.columns]
        identity = ["subject_id", "session_id", *entities]
        known = df[df["subject_id"].notna() & df["session_id"].notna()]
        dup = known.index[known.duplicated(identity, keep=False)]
        if len(dup):
            first = df.loc[dup[0]]
            which = " ".join(f"{c} {first[c]}" for c in entities if pd.notna(first[c]))
            hint = f"; add a column ({', '.join(IMAGE_ENTITIES)}) telling the images of a session apart"
            raise DataError(
                csv,
                f"duplicate rows: subject {first['subject_id']} session {first['session_id']}"
                f"{' ' + which if which else ''} on {_lines(dup)}{hint if not entities else ''}",
            )
