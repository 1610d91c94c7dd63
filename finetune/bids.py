"""A BIDS dataset as a manifest: ``python -m finetune manifest --bids ROOT --out manifest.csv``.

One row per T1w image, ``sub-<label>[/ses-<label>]/anat/sub-<label>[_ses-<label>][_acq-][_rec-][_run-]_T1w.nii[.gz]``,
found by its entities; the entities that tell a session's images apart (``acq``, ``rec``, ``run``) become columns, so
two runs of a session are two rows. ``derivatives/`` holds other programs' outputs and is read only when asked:
``derivatives=PIPELINE`` takes the T1w images of ``derivatives/PIPELINE/`` instead of the raw ones (``space`` and
``desc`` may tell them apart too). A file with other entities (``ce``, ``echo``, ``part`` ...) is left out, counted
in a warning.

Columns come from ``participants.tsv`` (required) and each subject's ``sub-<label>_sessions.tsv`` (or
``sessions.tsv``), where BIDS keeps what changes per visit, such as age: a session's value wins where both give one.
``n/a`` and empty cells stay empty; ``sex`` becomes ``F`` / ``M`` / ``O``; the label column becomes ``diagnosis``,
mapped by ``label_map``; ``site_from_sidecar`` takes ``site`` from each image's JSON sidecar (BIDS inheritance:
``T1w.json`` files higher up apply where their entities match) as manufacturer, model and field strength.

A subject with images but no ``participants.tsv`` row is kept with empty participant columns and counted in a
warning (the BIDS validator flags it, but refusing would leave a read-only dataset unusable; a task then leaves the
rows out as it does any empty label, counting them).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd

from common.data.manifest import IMAGE_ENTITIES, MANIFEST_COLUMNS, separator
from common.errors import ConfigError, DataError
from common.io import atomic_write_text

log = logging.getLogger(__name__)
NA = ("n/a", "")  # BIDS's missing value, and an empty cell
SEX = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O"}  # BIDS's values, any case
NIFTI = (".nii.gz", ".nii")
KNOWN_ENTITIES = ("sub", "ses", *IMAGE_ENTITIES)


def parse_label_map(text: str) -> dict[str, str]:
    """``Control=CN,Dementia=AD`` as ``{"Control": "CN", "Dementia": "AD"}``."""
    mapping = {}
    for pair in text.split(","):
        source, sep, target = (s.strip() for s in pair.partition("="))
        if not sep or not source or not target:
            raise ConfigError(f"--label-map: {pair.strip()!r} is not FROM=TO (e.g. Control=CN,Dementia=AD)")
        mapping[source] = target
    return mapping


def entities(name: str) -> tuple[dict[str, str], str] | None:
    """The entities and suffix of a BIDS file name (``sub-01_run-2_T1w.nii.gz`` -> ``{sub: 01, run: 2}, T1w``);
    None when the name is not ``key-value_..._suffix.ext``."""
    stem = name.split(".", 1)[0]
    *pairs, suffix = stem.split("_")
    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("-")
        if not sep or not key.isalnum() or not value.isalnum():
            return None
        found[key] = value
    return found, suffix


def _read_tsv(path: Path, id_column: str, prefix: str) -> pd.DataFrame:
    """A BIDS table as text, ``n/a`` as empty, indexed by ``id_column`` (its values given ``prefix`` if they
    lack it); the TSV line of each row in column ``_line``."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=list(NA))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot be read as a tab-separated table ({e})") from e
    table.columns = [str(c).strip() for c in table.columns]
    if id_column not in table.columns:
        raise DataError(path, f"has no {id_column!r} column (columns: {', '.join(table.columns)})")
    table = table.apply(lambda c: c.str.strip()).replace("", pd.NA)
    table["_line"] = range(2, len(table) + 2)
    ids = table[id_column]
    if ids.isna().any():
        raise DataError(path, f"{id_column!r} is empty on line {table['_line'][ids.isna()].iloc[0]}")
    table[id_column] = [v if v.startswith(prefix) else prefix + v for v in ids]
    twice = table[id_column][table[id_column].duplicated()]
    if len(twice):
        raise DataError(path, f"{twice.iloc[0]} has two rows; each {id_column} must have one")
    return table.set_index(id_column)


def _clean(table: pd.DataFrame, path: Path, label_column: str, label_map: dict[str, str] | None) -> pd.DataFrame:
    """Age checked as a number, sex normalised, the label column renamed ``diagnosis`` and mapped."""
    table = table.copy()
    if "age" in table.columns:
        bad = table["age"].notna() & pd.to_numeric(table["age"], errors="coerce").isna()
        if bad.any():
            raise DataError(
                path, f"age {table['age'][bad].iloc[0]!r} on line {table['_line'][bad].iloc[0]} is not a number"
            )
    if "sex" in table.columns:
        bad = table["sex"].notna() & ~table["sex"].str.lower().isin(list(SEX))
        if bad.any():
            raise DataError(
                path,
                f"sex {table['sex'][bad].iloc[0]!r} on line {table['_line'][bad].iloc[0]} is not a BIDS value "
                "(M, F, O, male, female, other, any case); recode it",
            )
        table["sex"] = table["sex"].str.lower().map(SEX)
    if label_column in table.columns and label_column != "diagnosis":
        if "diagnosis" in table.columns:
            raise ConfigError(
                f"{path}: has both {label_column!r} (--label-column) and 'diagnosis'; name one of them as the label"
            )
        table = table.rename(columns={label_column: "diagnosis"})
    if label_map is not None and "diagnosis" in table.columns:
        labels = table["diagnosis"]
        unknown = labels.notna() & ~labels.isin(list(label_map))
        if unknown.any():
            values = sorted(set(labels[unknown]))
            raise DataError(
                path,
                f"label(s) {', '.join(map(repr, values))} of column {label_column!r} (line "
                f"{table['_line'][unknown].iloc[0]}, {int(unknown.sum())} rows) not in --label-map "
                f"({', '.join(label_map)}); add {values[0]}=NEW to the map ({values[0]}={values[0]} keeps it)",
            )
        table["diagnosis"] = labels.map(label_map)
    return table.drop(columns="_line")


def _sessions(subject_dir: Path, label_column: str, label_map: dict[str, str] | None) -> pd.DataFrame | None:
    """The subject's sessions table (``sub-X/sub-X_sessions.tsv``, or ``sub-X/sessions.tsv``), or None."""
    found = [p for p in (subject_dir / f"{subject_dir.name}_sessions.tsv", subject_dir / "sessions.tsv") if p.is_file()]
    if len(found) > 1:
        raise DataError(subject_dir, f"holds both {found[0].name} and {found[1].name}; keep one")
    if not found:
        return None
    return _clean(_read_tsv(found[0], "session_id", "ses-"), found[0], label_column, label_map)


def find_images(base: Path) -> list[tuple[Path, dict[str, str]]]:
    """The T1w NIfTI files of ``base`` (a BIDS root or a derivatives pipeline) with their entities, in order; a
    file whose name disagrees with its folders is an error, one with entities the manifest cannot keep is left out."""
    found, skipped = [], []
    paths = sorted([*base.glob("sub-*/anat/*_T1w.nii*"), *base.glob("sub-*/ses-*/anat/*_T1w.nii*")])
    for path in paths:
        parsed = entities(path.name)
        if not path.name.endswith(NIFTI) or parsed is None:
            continue
        found_entities, _ = parsed
        parts = path.relative_to(base).parts  # (sub-X, [ses-Y,] anat, file)
        folders = {
            "sub": parts[0].removeprefix("sub-"),
            "ses": parts[1].removeprefix("ses-") if len(parts) == 4 else None,
        }
        wrong = [k for k in folders if found_entities.get(k) != folders[k]]
        if wrong:
            raise DataError(path, f"its name's {wrong[0]} disagrees with its folder; BIDS needs them equal")
        if set(found_entities) - set(KNOWN_ENTITIES):
            skipped.append(path)
            continue
        found.append((path, found_entities))
    if skipped:
        other = sorted({k for p in skipped for k in entities(p.name)[0]} - set(KNOWN_ENTITIES))
        log.warning(
            "left out %d T1w files with entities a manifest row does not keep (%s), e.g. %s",
            len(skipped),
            ", ".join(other),
            skipped[0],
        )
    return found


def sidecar(image: Path, base: Path, image_entities: dict[str, str]) -> dict:
    """The image's JSON metadata by BIDS inheritance: every ``*T1w.json`` from ``base`` down to the image's folder
    whose entities the image shares, the deeper and more specific ones winning."""
    merged: dict = {}
    below = image.parent.relative_to(base).parts  # (sub-X, [ses-Y,] anat)
    for folder in [base / Path(*below[:depth]) for depth in range(len(below) + 1)]:
        applicable = []
        for path in folder.glob("*T1w.json"):
            parsed = entities(path.name)  # the top-level T1w.json has no entities and applies to every image
            if parsed and parsed[1] == "T1w" and parsed[0].items() <= image_entities.items():
                applicable.append((len(parsed[0]), path))
        for _, path in sorted(applicable):
            try:
                merged.update(json.loads(path.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(path, f"is not valid JSON ({e})") from e
    return merged


def scanner(metadata: dict) -> str | None:
    """A site name from sidecar metadata: manufacturer, model and field strength (``Siemens Prisma 3T``)."""
    parts = [str(metadata[k]).strip() for k in ("Manufacturer", "ManufacturersModelName") if metadata.get(k)]
    if not parts:
        return None
    strength = metadata.get("MagneticFieldStrength")
    if isinstance(strength, (int, float)) and strength > 0:  # tesla, a number in BIDS
        parts.append(f"{strength:g}T")
    return " ".join(parts)


def bids_manifest(
    root: str | Path,
    out: str | Path,
    label_map: dict[str, str] | None = None,
    label_column: str | None = None,
    site_from_sidecar: bool = False,
    derivatives: str | None = None,
) -> pd.DataFrame:
    """The manifest of the BIDS dataset ``root``: one row per T1w image, ``path`` relative to ``out``'s folder.

    ``label_column``: the participants/sessions column holding the label (default ``diagnosis``), written as
    ``diagnosis`` and mapped by ``label_map`` (a label it lacks is an error). Raises ``DataError`` naming the file.
    """
    root = Path(root).expanduser().resolve()
    participants_file = root / "participants.tsv"
    if not participants_file.is_file():
        raise DataError(participants_file, "not found; a BIDS dataset lists its subjects there (participant_id, ...)")
    column = label_column or "diagnosis"
    participants = _clean(_read_tsv(participants_file, "participant_id", "sub-"), participants_file, column, label_map)
    base = root / "derivatives" / derivatives if derivatives else root
    if not base.is_dir():
        pipelines = sorted(p.name for p in (root / "derivatives").glob("*") if p.is_dir())
        raise DataError(base, f"no such derivatives folder; the pipelines there: {', '.join(pipelines) or 'none'}")
    images = find_images(base)
    if not images:
        raise DataError(base, "holds no T1w image (sub-*/[ses-*/]anat/sub-*_T1w.nii[.gz])")
    dataset = _dataset_name(root)
    sessions = {s: _sessions(root / f"sub-{s}", column, label_map) for s in sorted({e["sub"] for _, e in images})}
    if (label_column or label_map) and not _has_labels(participants, sessions):
        raise DataError(
            participants_file,
            f"has no label column {column!r} (nor do the sessions tables); name it with --label-column "
            f"(columns: {', '.join(participants.columns)})",
        )
    folder = Path(out).expanduser().resolve().parent
    rows, unlisted, no_scanner = [], set(), 0
    for path, found in images:
        subject = f"sub-{found['sub']}"
        row: dict = {"dataset": dataset}
        if subject in participants.index:
            row.update(participants.loc[subject].dropna().to_dict())
        else:
            unlisted.add(subject)
        session = f"ses-{found['ses']}" if "ses" in found else None
        table = sessions[found["sub"]]
        if session and table is not None and session in table.index:
            row.update(table.loc[session].dropna().to_dict())  # a session's value wins over the participant's
        row.update({"path": os.path.relpath(path, folder), "subject_id": subject, "session_id": session})
        row.update({k: found[k] for k in IMAGE_ENTITIES if k in found})
        if site_from_sidecar:
            row["site"] = scanner(sidecar(path, base, found))
            no_scanner += row["site"] is None
        rows.append(row)
    if unlisted:
        shown = ", ".join(sorted(unlisted)[:5]) + (", ..." if len(unlisted) > 5 else "")
        log.warning(
            "%s: %d subjects with images are not listed (%s); their rows have empty participant columns",
            participants_file,
            len(unlisted),
            shown,
        )
    if no_scanner:
        log.warning(
            "%d images have no Manufacturer / ManufacturersModelName in their sidecars: site left empty", no_scanner
        )
    absent = sorted(set(participants.index) - {f"sub-{e['sub']}" for _, e in images})
    if absent:
        log.info("%s: %d listed subjects have no T1w image (%s ...)", participants_file, len(absent), absent[0])
    return _table(rows)


def _dataset_name(root: Path) -> str:
    """``Name`` of ``dataset_description.json``, else the folder's name."""
    description = root / "dataset_description.json"
    try:
        name = json.loads(description.read_text()).get("Name") if description.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(description, f"is not valid JSON ({e})") from e
    return str(name).strip() if name else root.name


def _has_labels(participants: pd.DataFrame, sessions: dict[str, pd.DataFrame | None]) -> bool:
    tables = [participants, *(t for t in sessions.values() if t is not None)]
    return any("diagnosis" in t.columns for t in tables)


def _table(rows: list[dict]) -> pd.DataFrame:
    """The rows as a manifest: our columns first, then the entities, then the dataset's own columns; a column
    empty on every row left out; two images with the same entities refused."""
    df = pd.DataFrame(rows)
    identity = df.reindex(columns=["subject_id", "session_id", *IMAGE_ENTITIES]).astype("string").fillna("")
    twice = df["path"][identity.duplicated(keep=False)]
    if len(twice):
        raise DataError(twice.iloc[0], f"has the same entities as {twice.iloc[1]}; keep one of the two")
    first = [c for c in (*MANIFEST_COLUMNS, *IMAGE_ENTITIES) if c in df.columns]
    df = df[first + [c for c in df.columns if c not in first]]
    return df.loc[:, df.notna().any() | df.columns.isin(["path", "subject_id"])]


def write_manifest(df: pd.DataFrame, out: str | Path) -> Path:
    """Write the manifest atomically (tab-separated for ``.tsv``, else CSV), creating its folder."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out, df.to_csv(index=False, sep=separator(out)))
