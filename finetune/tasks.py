"""Downstream tasks: what to predict from a manifest (which column, classification or regression, which rows).

Named tasks: ``ad`` (CN vs AD), ``pd`` (HC vs PD), ``brain_age`` (age in years). Any manifest column works
too:
``classify:COLUMN`` (every distinct value a class) and ``regress:COLUMN`` (numeric). A row whose label cell is
empty is left out and counted (``missing=drop``, the default) or refused (``missing=error``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from common.errors import ConfigError, DataError


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "classification" or "regression"
    column: str  # the manifest column holding the label
    classes: tuple[str, ...] | None = None  # class values in label order (negative first); None: all values seen

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"


NAMED_TASKS = {
    "ad": Task("ad", "classification", "diagnosis", ("CN", "AD")),
    "pd": Task("pd", "classification", "diagnosis", ("HC", "PD")),
    "brain_age": Task("brain_age", "regression", "age"),
}


def get_task(name: str) -> Task:
    """A named task, or ``classify:COLUMN`` / ``regress:COLUMN`` on any manifest column."""
    if name in NAMED_TASKS:
        return NAMED_TASKS[name]
    kind, sep, column = name.partition(":")
    if sep and column and kind in ("classify", "regress"):
        return Task(name, "classification" if kind == "classify" else "regression", column)
    raise ConfigError(f"unknown task {name!r}; use one of {', '.join(NAMED_TASKS)}, classify:COLUMN or regress:COLUMN")


def _csv_lines(rows: pd.Index) -> str:
    """CSV line numbers (the header is line 1) of manifest rows, the first ten."""
    lines = [str(int(i) + 2) for i in rows]
    return ", ".join(lines[:10]) + (" ..." if len(lines) > 10 else "")


@dataclass
class Labelled:
    """The manifest rows a task uses, with the numeric target ``y`` aligned to ``df``."""

    df: pd.DataFrame  # the rows kept, index reset
    y: np.ndarray  # int64 class indices or float64 targets
    classes: tuple[str, ...] | None  # class names by index
    dropped: dict[str, int] = field(default_factory=dict)  # rows left out, by label (the config's drop_labels)
    missing: int = 0  # rows left out because their label cell is empty (the config's missing=drop)


def label_rows(task: Task, df: pd.DataFrame, source: str, drop: Sequence[str] = (), missing: str = "drop") -> Labelled:
    """Keep the rows the task uses and encode their labels; rows labelled with a value in ``drop`` are left out
    and counted, and so are rows whose label cell is empty when ``missing`` is ``drop`` (``error``: refused).

    Raises ``DataError`` naming ``source`` (the manifest) when the label column is missing, a row has a label
    the task does not know and ``drop`` does not name (values and rows named), a label is empty and ``missing``
    is ``error``, a regression label is not numeric, or fewer than two classes remain.
    """
    if task.column not in df.columns:
        raise DataError(
            source,
            f"task {task.name!r} needs column {task.column!r}, which the manifest lacks "
            f"(columns: {', '.join(map(str, df.columns))})",
        )
    empty = df[task.column].isna().to_numpy(bool)
    if empty.all():
        raise DataError(
            source, f"column {task.column!r} is empty on all {len(df)} rows; task {task.name!r} has no labels"
        )
    if empty.any() and missing == "error":
        raise DataError(
            source,
            f"column {task.column!r} is empty on {int(empty.sum())} rows (CSV lines {_csv_lines(df.index[empty])}); "
            "fill them, or leave them out with missing=drop",
        )
    df = df[~empty]  # the index still holds the CSV rows, for the line numbers below
    values = df[task.column]
    if task.is_classification:
        dropped: dict[str, int] = {}
        if task.classes is not None:
            text = values.astype("string")
            keep = text.isin(task.classes).to_numpy(bool)
            left_out = text.isin(list(drop)).to_numpy(bool) & ~keep
            unknown = ~keep & ~left_out
            if unknown.any():
                found = sorted(set(text[unknown]))
                raise DataError(
                    source,
                    f"column {task.column!r} holds labels task {task.name!r} does not know: "
                    f"{', '.join(repr(v) for v in found)} on {int(unknown.sum())} rows (CSV lines "
                    f"{_csv_lines(df.index[unknown])}); it knows "
                    f"{', '.join(task.classes)}. Fix the labels, or leave these rows out with drop_labels={found}",
                )
            dropped = {str(v): int(n) for v, n in text[left_out].value_counts().sort_index().items()}
            df = df[keep].reset_index(drop=True)
            values = df[task.column].astype(str)
            classes = task.classes
        else:
            values = values.astype(str)
            classes = tuple(sorted(values.unique()))
        present = sorted(set(values))
        if len(present) < 2:
            wanted = f" (task {task.name} needs {' and '.join(task.classes)})" if task.classes else ""
            raise DataError(
                source,
                f"column {task.column!r} has {len(present)} class(es) {present} among the "
                f"task's rows{wanted}; a classifier needs at least two",
            )
        index = {c: i for i, c in enumerate(classes)}
        y = np.array(values.map(index), dtype=np.int64)
        return Labelled(df.reset_index(drop=True), y, classes, dropped, int(empty.sum()))
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna().to_numpy(bool)
    if bad.any():
        raise DataError(
            source,
            f"column {task.column!r} must be numeric for task {task.name!r}: {values[bad].iloc[0]!r} on "
            f"{int(bad.sum())} rows (CSV lines {_csv_lines(df.index[bad])})",
        )
    if numeric.nunique() < 2:
        raise DataError(source, f"column {task.column!r} has a single value; nothing to regress")
    return Labelled(df.reset_index(drop=True), np.array(numeric, dtype=np.float64), None, {}, int(empty.sum()))
