"""Leakage-safe evaluation protocol: subject-level stratified folds, nested training fractions, site / dataset
hold-outs, and the checks that no subject or identical image sits on two sides of a split.

Everything here works on subjects, never on rows: a subject's sessions go together, and subjects whose images
are byte-identical (a duplicate under two IDs) are merged into one group before splitting.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, LeaveOneGroupOut, StratifiedGroupKFold

from common.checkpoint import read_export_metadata
from common.data import read_manifest
from common.errors import ConfigError, DataError
from common.io import file_hash
from common.weights import parse_init

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
SCHEMES = ("kfold", "holdout", "ood", "loso")  # protocol.scheme


@dataclass
class ProtocolConfig:
    """How subjects are divided into train / validation / test."""

    scheme: str = "kfold"  # SCHEMES: stratified k-fold CV, holdout, ood (held-out sites/datasets), loso
    folds: int = 5  # k for "kfold"
    repeats: int = 1  # k-fold repeated with a new shuffle (fold ids continue: repeat r, fold i -> r * k + i)
    test_fraction: float = 0.2  # share of subjects in the test set for "holdout"
    val_fraction: float = 0.15  # share of each fold's training subjects held out for early stopping / tuning
    ood_sites: list[str] = field(default_factory=list)  # "ood": test on these sites ...
    ood_datasets: list[str] = field(default_factory=list)  # ... and/or these datasets; train on the rest
    site_column: str = "site"  # the column "loso" leaves out one value of at a time
    splits_file: str | None = None  # a given splits.csv (subject_id, fold, split) instead of making folds
    pretrain_manifests: list[str] = field(default_factory=list)  # no test image may appear in these ...
    allow_pretrain_overlap: bool = False  # ... nor in the init's recorded pre-training images, unless this is true
    check_duplicates: bool = True  # hash image files to find identical images under different subjects


@dataclass
class Fold:
    """One train / val / test division of subject IDs (``train`` is the full training pool's subjects)."""

    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    name: str = ""  # e.g. the held-out site for "loso"


# --------------------------------------------------------------------------------------------- subjects
@lru_cache(maxsize=65536)
def _file_digest(path: str, size: int, mtime: float, algorithm: str) -> str:
    return file_hash(path, algorithm)  # size and mtime are in the cache key: a changed file is hashed again


def file_digest(path: str | Path, algorithm: str = "sha1") -> str:
    """Hex digest (SHA-1 unless another ``hashlib`` algorithm is named) of a file's bytes, cached per path, size
    and modification time."""
    st = Path(path).stat()
    return _file_digest(str(path), st.st_size, st.st_mtime, algorithm)


def subject_table(df: pd.DataFrame, y: np.ndarray, classification: bool, hash_images: bool = True) -> pd.DataFrame:
    """One row per subject: ``subject_id``, ``strata`` (class or age quintile), ``site``, ``dataset``,
    ``group``.

    ``group`` joins subjects that share a byte-identical image, so they are never split apart.
    """
    rows = df.assign(_y=y)
    first = rows.groupby("subject_id", sort=True).first()
    if classification:
        strata = rows.groupby("subject_id", sort=True)["_y"].agg(lambda v: int(pd.Series(v).mode().iloc[0]))
    else:
        mean = rows.groupby("subject_id", sort=True)["_y"].mean()
        bins = min(5, max(1, len(mean) // 10))
        strata = pd.qcut(mean.rank(method="first"), q=bins, labels=False) if bins > 1 else mean * 0
    table = pd.DataFrame(
        {
            "subject_id": first.index.astype(str),
            "strata": np.asarray(strata, dtype=np.int64),
            "site": first["site"].astype(str).to_numpy() if "site" in first else "all",
            "dataset": first["dataset"].astype(str).to_numpy() if "dataset" in first else "all",
        }
    )
    table["group"] = _identical_image_groups(rows, table["subject_id"], hash_images)
    return table


def _identical_image_groups(rows: pd.DataFrame, subjects: pd.Series, hash_images: bool) -> np.ndarray:
    index = {s: i for i, s in enumerate(subjects)}
    parent = list(range(len(subjects)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if hash_images and "path" in rows.columns:
        owner: dict[str, int] = {}
        for path, subject in zip(rows["path"], rows["subject_id"].astype(str)):
            digest = file_digest(path)
            i = index[subject]
            if digest in owner:
                parent[find(i)] = find(owner[digest])
            else:
                owner[digest] = i
    return np.array([find(i) for i in range(len(subjects))])


# --------------------------------------------------------------------------------------------- folds
def _stratified_groups(subjects: pd.DataFrame, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k folds of row positions, whole groups per fold, stratified when every stratum has k groups."""
    n_groups = subjects["group"].nunique()
    if n_splits > n_groups:
        raise ConfigError(f"cannot make {n_splits} folds from {n_groups} subjects; lower protocol.folds")
    smallest = subjects.groupby("strata")["group"].nunique().min()
    if smallest >= n_splits:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return list(splitter.split(subjects, subjects["strata"], subjects["group"]))
    splitter = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)  # too few of a class to stratify
    return list(splitter.split(subjects, groups=subjects["group"]))


def _sample_groups(subjects: pd.DataFrame, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, sample) row positions: ``fraction`` of each stratum's groups (at least one), whole groups."""
    rng = np.random.default_rng(seed)
    first = subjects.groupby("group", sort=True)["strata"].first()
    chosen: list[int] = []
    for _, groups in first.groupby(first):
        ids = groups.index.to_numpy()
        n = min(len(ids) - 1, max(1, round(fraction * len(ids)))) if len(ids) > 1 else 0
        chosen += list(rng.permutation(ids)[:n])
    sample = subjects["group"].isin(chosen).to_numpy()
    return np.flatnonzero(~sample), np.flatnonzero(sample)


def _carve_val(subjects: pd.DataFrame, pool: np.ndarray, val_fraction: float, seed: int):
    """Split the training pool (row positions) into (train, val) by group, stratified."""
    if val_fraction <= 0:
        return pool, pool[:0]
    train_pos, val_pos = _sample_groups(subjects.iloc[pool], val_fraction, seed + 7919)
    return pool[train_pos], pool[val_pos]


def make_folds(subjects: pd.DataFrame, cfg: ProtocolConfig, seed: int) -> list[Fold]:
    """Folds of subject IDs for ``cfg.scheme``; validation carved from each fold's training subjects."""
    ids = subjects["subject_id"].to_numpy()
    outer: list[tuple[np.ndarray, np.ndarray, str]] = []
    if cfg.scheme == "kfold":
        if cfg.folds < 2:
            raise ConfigError(f"protocol.folds must be >= 2 for k-fold, got {cfg.folds}")
        for r in range(cfg.repeats):
            outer += [(tr, te, f"repeat{r}") for tr, te in _stratified_groups(subjects, cfg.folds, seed + 1009 * r)]
    elif cfg.scheme == "holdout":
        if not 0 < cfg.test_fraction < 1:
            raise ConfigError(f"protocol.test_fraction must lie in (0, 1), got {cfg.test_fraction}")
        tr, te = _sample_groups(subjects, cfg.test_fraction, seed)
        outer.append((tr, te, "holdout"))
    elif cfg.scheme == "ood":
        held = subjects["site"].isin(cfg.ood_sites) | subjects["dataset"].isin(cfg.ood_datasets)
        if not cfg.ood_sites and not cfg.ood_datasets:
            raise ConfigError("protocol.scheme=ood needs protocol.ood_sites or protocol.ood_datasets")
        if not held.any() or held.all():
            raise ConfigError(
                f"ood sites {cfg.ood_sites} / datasets {cfg.ood_datasets} select "
                f"{int(held.sum())} of {len(held)} subjects; the test and training sides must "
                "both be non-empty"
            )
        outer.append((np.flatnonzero(~held), np.flatnonzero(held), "ood"))
    elif cfg.scheme == "loso":
        column = cfg.site_column if cfg.site_column in subjects else "site"
        sites = subjects[column]
        if sites.nunique() < 2:
            raise ConfigError(f"leave-one-site-out needs at least two values in {column!r}")
        for tr, te in LeaveOneGroupOut().split(subjects, groups=sites):
            outer.append((tr, te, f"site {sites.iloc[te[0]]}"))
    else:
        raise ConfigError(f"protocol.scheme must be one of {SCHEMES}, got {cfg.scheme!r}")
    folds = []
    for i, (pool, test, name) in enumerate(outer):
        train, val = _carve_val(subjects, pool, cfg.val_fraction, seed + i)
        folds.append(Fold(i, ids[train], ids[val], ids[test], name))
    return folds


def nested_subset(subjects: pd.DataFrame, train_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The first ``fraction`` of each stratum of ``train_ids`` in a seeded order that does not depend on the
    fraction, so the subset for 10 % lies inside the one for 25 %, and so on; at least one per stratum."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"training fractions must lie in (0, 1], got {fraction}")
    if fraction == 1:
        return np.asarray(train_ids)
    part = subjects.set_index("subject_id").loc[list(train_ids)]
    rng = np.random.default_rng(seed)
    order = pd.Series(rng.permutation(len(part)), index=part.index)
    keep: list[str] = []
    for _, members in part.groupby("strata"):
        ranked = order.loc[members.index].sort_values().index
        keep += list(ranked[: max(1, math.ceil(fraction * len(ranked)))])
    return np.array(sorted(keep, key=lambda s: order[s]))


# --------------------------------------------------------------------------------------------- checks
def splits_frame(folds: Sequence[Fold], train_subsets: dict[int, np.ndarray] | None = None) -> pd.DataFrame:
    """``subject_id, fold, split`` rows; training-pool subjects outside the subset used are ``unused``."""
    rows = []
    for f in folds:
        used = set(train_subsets[f.fold]) if train_subsets else set(f.train)
        rows += [(s, f.fold, "train" if s in used else "unused") for s in f.train]
        rows += [(s, f.fold, "val") for s in f.val] + [(s, f.fold, "test") for s in f.test]
    return pd.DataFrame(rows, columns=["subject_id", "fold", "split"])


def check_splits(splits: pd.DataFrame, df: pd.DataFrame, source: str, hash_images: bool = True) -> None:
    """Raise ``DataError`` if, within a fold, a subject or a byte-identical image is on two sides."""
    for fold, part in splits.groupby("fold"):
        sides = part.groupby("subject_id")["split"].nunique()
        twice = sides.index[sides > 1]
        if len(twice):
            raise DataError(
                source,
                f"fold {fold}: subject(s) {', '.join(map(str, twice[:5]))} are in more than one "
                "of train/val/test; split by subject",
            )
        if not hash_images:
            continue
        side_of = dict(zip(part["subject_id"].astype(str), part["split"]))
        seen: dict[str, tuple[str, str]] = {}
        for path, subject in zip(df["path"], df["subject_id"].astype(str)):
            side = side_of.get(subject)
            if side is None or side == "unused":
                continue
            digest = file_digest(path)
            if digest in seen and seen[digest][1] != side:
                raise DataError(
                    source,
                    f"fold {fold}: the same image is in {seen[digest][1]} ({seen[digest][0]}) "
                    f"and {side} ({path}); remove the duplicate or keep both on one side",
                )
            seen.setdefault(digest, (path, side))


def read_splits(path: str | Path, subjects: Iterable[str]) -> list[Fold]:
    """Folds from a given ``splits.csv`` (subject_id, fold, split); unknown subjects are an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "splits file not found")
    table = pd.read_csv(path, dtype={"subject_id": str})
    missing = [c for c in ("subject_id", "fold", "split") if c not in table.columns]
    if missing:
        raise DataError(path, f"splits file lacks column(s) {', '.join(missing)}")
    bad = sorted(set(table["split"]) - {*SPLITS, "unused"})
    if bad:
        raise DataError(path, f"unknown split value(s) {bad}; use train, val, test")
    unknown = sorted(set(table["subject_id"]) - set(map(str, subjects)))
    if unknown:
        raise DataError(path, f"subject(s) not in the manifest: {', '.join(unknown[:5])}")
    folds = []
    for fold, part in table.groupby("fold"):
        by = {s: part.loc[part["split"] == s, "subject_id"].to_numpy() for s in SPLITS}
        if not len(by["train"]) or not len(by["test"]):
            raise DataError(path, f"fold {fold} needs train and test subjects")
        folds.append(Fold(int(fold), by["train"], by["val"], by["test"]))
    return folds


def check_pretrain_overlap(test_paths: Iterable[str], cfg: ProtocolConfig, init: str) -> None:
    """Refuse test images the encoder has seen: one listed in ``cfg.pretrain_manifests`` (same file or same bytes),
    or one whose content hash the export ``init`` records among its pre-training images (``seen``, written by
    ``pretrain.provenance``). ``cfg.allow_pretrain_overlap`` turns the ``DataError`` into a warning."""
    tests = list(dict.fromkeys(str(p) for p in test_paths))
    found = _in_manifests(tests, cfg.pretrain_manifests) + _in_export(tests, init)
    if not found:
        return
    source, first, what = found[0]
    more = sorted({image for _, image, _ in found} - {first})
    also = f" (and {len(more)} more test image(s): {', '.join(more[:5])}{', ...' if len(more) > 5 else ''})"
    what += also if more else ""
    if cfg.allow_pretrain_overlap:
        log.warning("%s: %s; its test scores flatter the init (protocol.allow_pretrain_overlap=true)", source, what)
        return
    raise DataError(
        source,
        f"{what}; the encoder has seen it, so its test scores would flatter the init — remove it from one of the "
        "two, or set protocol.allow_pretrain_overlap=true to run anyway",
    )


def _in_manifests(tests: list[str], manifests: Sequence[str | Path]) -> list[tuple[str, str, str]]:
    """(manifest, test image, what) for each test image that a pre-training manifest lists or holds a byte copy of."""
    found = []
    resolved = {str(Path(p).resolve()): p for p in tests}
    sizes: dict[int, list[str]] = {}
    for p in tests:
        sizes.setdefault(Path(p).stat().st_size, []).append(p)
    for manifest in manifests:
        pre = read_manifest(manifest, required=("path",), check_files=False)
        for p in pre["path"]:
            path = Path(p).resolve()
            if str(path) in resolved:
                image = resolved[str(path)]
                found.append((str(manifest), image, f"test image {image} is in this pre-training manifest"))
                continue
            if not path.is_file():
                continue
            for candidate in sizes.get(path.stat().st_size, []):
                if file_digest(candidate) == file_digest(path):
                    what = f"test image {candidate} is byte-identical to pre-training image {p}"
                    found.append((str(manifest), candidate, what))
    return found


def _in_export(tests: list[str], init: str) -> list[tuple[str, str, str]]:
    """(export, test image, what) for each test image whose content hash the export ``init`` records as seen in
    pre-training (nothing for an init that is not our export; a warning for an export that records no images)."""
    kind, path = parse_init(init)
    if kind != "export":
        return []
    seen = read_export_metadata(path).get("seen")
    if seen is None:
        log.warning(
            "%s records no pre-training images (exported before the leakage record): a test image it was "
            "pre-trained on is not detected; list its corpus in protocol.pretrain_manifests",
            path,
        )
        return []
    if seen["unhashed"]:
        log.warning(
            "%s: %d of its pre-training images were gone from disk when it was trained (a pack of moved files) "
            "and are not checked against the test images",
            path,
            seen["unhashed"],
        )
    images, digits = set(seen["images"]), int(seen["digits"])
    return [
        (str(path), p, f"test image {p} was in the encoder's pre-training data (the export records its content hash)")
        for p in tests
        if file_digest(p, seen["hash"])[:digits] in images
    ]
