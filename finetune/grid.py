"""The benchmark grid: backbones × inits × tasks × fractions × seeds, each cell a ``run_cell``; resumable
(a cell whose ``metrics.json`` exists is skipped), then ``results.csv``, ``gains.csv`` (paired gains against
scratch and the classical baseline), ``results.md``, plots and TensorBoard.

``run_grid(cfg, out_dir)`` is the Python entry point (the experiment orchestration calls it too).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from common.config import load_config, save_config, to_object
from common.errors import ConfigError
from finetune.config import GridConfig, RunConfig
from finetune.gains import compute_gains
from finetune.gains import markdown as gains_markdown
from finetune.report import write_report
from finetune.run import (
    METRICS_FILE,
    Prepared,
    TaskData,
    check_init_path,
    load_task_data,
    prepare,
    run_cell,
    task_data_key,
)
from finetune.tasks import get_task

log = logging.getLogger(__name__)


@dataclass
class Cell:
    task: str
    backbone: str  # the label
    init: str  # the init's label
    fraction: float
    seed: int
    cfg: RunConfig

    @property
    def key(self) -> str:
        return f"{self.task}/{self.backbone}/{self.init}/frac{self.fraction:g}/seed{self.seed}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def expand(cfg: GridConfig, out_dir: Path) -> list[Cell]:
    """Every cell of the grid, with its ``RunConfig``; checks labels, tasks and init paths up front."""
    if not cfg.tasks:
        raise ConfigError("grid.tasks is empty: map each task to its manifest, e.g. tasks: {ad: cohort/manifest.csv}")
    labels = [b.label for b in cfg.backbones]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"backbone labels must be unique, got {labels}")
    for entry in cfg.inits:
        unknown = sorted(set(entry.backbones) - set(labels))
        if unknown:
            raise ConfigError(f"init {entry.name!r} names unknown backbone label(s) {unknown}; known: {labels}")
        check_init_path(entry.spec)
    cells = []
    for task, manifest in cfg.tasks.items():
        get_task(task)
        for bb in cfg.backbones:
            for entry in cfg.inits:
                if entry.backbones and bb.label not in entry.backbones:
                    continue
                for fraction in cfg.fractions:
                    for seed in cfg.seeds:
                        run = _with_overrides(cfg.base, [*bb.overrides, *entry.overrides], bb.label, entry.name)
                        run.task, run.manifest, run.init = task, manifest, entry.spec
                        run.model.backbone, run.model.kwargs = bb.name, dict(bb.kwargs)
                        run.fraction, run.train.seed = float(fraction), int(seed)
                        run.cache_dir = run.cache_dir or str(out_dir / "cache")
                        cells.append(Cell(task, bb.label, entry.name, float(fraction), int(seed), run))
    return cells


def _with_overrides(base: RunConfig, overrides: list[str], backbone: str, init: str) -> RunConfig:
    """``base`` with the backbone's, then the init's ``key=value`` overrides (the init's win)."""
    if not overrides:
        return copy.deepcopy(base)
    try:  # common.config: its strings stay literal, its errors are one line naming the key
        return to_object(load_config(base, overrides=overrides))
    except ConfigError as e:
        raise ConfigError(f"backbone {backbone!r}, init {init!r}: overrides {list(overrides)}: {e}") from None


def cell_dir(out_dir: Path, cell: Cell) -> Path:
    return out_dir / "cells" / Path(*[_slug(p) for p in cell.key.split("/")])


def run_grid(cfg: GridConfig | DictConfig, out_dir: str | Path) -> pd.DataFrame:
    """Run (or resume) the grid into ``out_dir``; returns the results table (one row per cell)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(OmegaConf.structured(cfg), out / "config.yaml")
    cells = expand(cfg, out)
    todo = [c for c in cells if not (cell_dir(out, c) / METRICS_FILE).is_file()]
    log.info("grid: %d cells, %d finished, %d to run", len(cells), len(cells) - len(todo), len(todo))
    # Every task's inputs (manifest, labels, images) are read and checked once, and every (task, backbone, init)
    # has its weights, splits and leakage checked, before the first cell trains. The data is passed on, and
    # the first cell of each combination gets what was prepared for it (held in memory until it runs).
    data: dict[str, TaskData] = {}
    prepared: dict[str, Prepared] = {}  # cell key -> its preparation
    checked: set[str] = set()
    for cell in todo:
        key = task_data_key(cell.cfg)
        if key not in data:
            data[key] = load_task_data(cell.cfg)
        combination = json.dumps([key, cell.backbone, cell.init])
        if combination not in checked:
            prepared[cell.key] = prepare(cell.cfg, data[key])
            checked.add(combination)
    for i, cell in enumerate(todo):
        log.info("grid cell %d/%d: %s", i + 1, len(todo), cell.key)
        prep = prepared.pop(cell.key, None) or prepare(cell.cfg, data[task_data_key(cell.cfg)])
        run_cell(cell.cfg, cell_dir(out, cell), prep)
    results = collect(out, cells)
    gains = compute_gains(results, out, cfg.min_test_subjects, n_boot=cfg.base.bootstrap)
    gains.to_csv(out / "gains.csv", index=False)
    write_report(results, out, metrics=cfg.metrics or None, gains=gains_markdown(gains, cfg.min_test_subjects))
    return results


def _train_subjects(cell: Path) -> float:
    """The subjects a cell trained on, per fold (mean over its folds): the label budget its metrics are plotted at."""
    splits = pd.read_csv(cell / "splits.csv")
    return float((splits["split"] == "train").groupby(splits["fold"]).sum().mean())


def collect(out: Path, cells: list[Cell]) -> pd.DataFrame:
    """One row per finished cell: identifiers, the training subjects per fold, test metrics with CI bounds, the
    trivial baseline and the classical one (``classical_*``, with the primary metric's CI)."""
    rows = []
    for cell in cells:
        path = cell_dir(out, cell) / METRICS_FILE
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        row = {
            "task": cell.task,
            "backbone": cell.backbone,
            "init": cell.init,
            "fraction": cell.fraction,
            "seed": cell.seed,
            "mode": m["mode"],
            "primary": m["primary"],
            "higher_is_better": m["higher_is_better"],
            "n_subjects": m["n_subjects"],
            "n_train_subjects": _train_subjects(path.parent),
            "n_test_images": m["n_test_images"],
            "run_dir": str(path.parent.relative_to(out)),
        }
        row.update({k: (float("nan") if v is None else v) for k, v in m["metrics"].items()})
        row.update(
            {
                f"baseline_{k}": (float("nan") if v is None else v)
                for k, v in m["baseline"].items()
                if not k.endswith(("_lo", "_hi"))
            }
        )
        row.update(
            {
                f"classical_{k}": (float("nan") if v is None else v)
                for k, v in m.get("classical", {}).items()
                if not k.endswith(("_lo", "_hi")) or k.startswith(m["primary"])
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)
