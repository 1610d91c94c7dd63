"""The grid's outputs: ``results.csv`` (one row per cell), ``results.md`` (mean and 95 % CI per cell, best per
task and fraction marked), PNG plots (metric vs training subjects per init; per-site bars) and TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from common.tb import RankZeroWriter  # noqa: E402
from finetune.metrics import with_ci  # noqa: E402
from finetune.tasks import get_task  # noqa: E402

DEFAULT_METRICS = {
    "classification": ["roc_auc", "balanced_accuracy", "accuracy", "f1", "sensitivity", "specificity"],
    "regression": ["mae", "mae_corrected", "rmse", "pearson_r", "r2"],
}
KEYS = ["task", "backbone", "init", "fraction"]
METRIC_WORDS = {"roc_auc": "ROC-AUC", "mae": "MAE"}  # the primary metrics (finetune.metrics.PRIMARY) on an axis


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per (task, backbone, init, fraction) of every metric and of its CI bounds."""
    numeric = [
        c
        for c in results.columns
        if c not in KEYS and pd.api.types.is_numeric_dtype(results[c]) and c not in ("seed", "higher_is_better")
    ]
    grouped = results.groupby(KEYS, sort=True)
    summary = grouped[numeric].mean().reset_index()
    summary["n_seeds"] = grouped.size().to_numpy()
    summary["primary"] = grouped["primary"].first().to_numpy()
    summary["higher_is_better"] = grouped["higher_is_better"].first().to_numpy()
    summary["mode"] = grouped["mode"].first().to_numpy()
    return summary


def markdown(summary: pd.DataFrame, metrics: list[str] | None = None) -> str:
    """``results.md``: a table per task; ★ marks the best primary metric at each training fraction."""
    lines = [
        "# Fine-tuning results",
        "",
        "Mean over seeds; brackets: 95 % bootstrap CI over test subjects (bounds averaged over seeds). "
        "Test predictions pooled over the folds of each cell. ★ = best per task and training fraction.",
        "",
    ]
    for task, part in summary.groupby("task", sort=False):
        primary, higher = part["primary"].iloc[0], bool(part["higher_is_better"].iloc[0])
        kind = "classification" if primary == "roc_auc" else "regression"
        cols = [m for m in (metrics or DEFAULT_METRICS[kind]) if m in part.columns and m != primary]
        best = part.groupby("fraction")[primary].transform("max" if higher else "min")
        lines += [
            f"## {task}",
            "",
            "| backbone | init | mode | fraction | seeds | " + primary + " (95 % CI) | " + " | ".join(cols) + " |",
            "|" + "---|" * (6 + len(cols)),
        ]
        for (_, row), top in zip(part.iterrows(), best):
            mark = " ★" if np.isfinite(row[primary]) and math.isclose(row[primary], top) else ""
            cells = [
                row["backbone"],
                row["init"],
                row["mode"],
                f"{row['fraction']:g}",
                str(int(row["n_seeds"])),
                with_ci(row[primary], row.get(f"{primary}_lo"), row.get(f"{primary}_hi")) + mark,
            ]
            cells += [with_ci(row[c]) for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
        base = part.get(f"baseline_{primary}")
        if base is not None and base.notna().any():
            what = "chance (training-set class priors)" if kind == "classification" else "training-mean predictor"
            lines += ["", f"Trivial baseline, {what}: {primary} = {base.mean():.3f}"]
        lines += _classical_lines(part, primary)
        lines.append("")
    return "\n".join(lines)


def _classical_lines(part: pd.DataFrame, primary: str) -> list[str]:
    # one classical baseline per fraction (it depends on the splits, not on the backbone or init)
    if f"classical_{primary}" not in part or not part[f"classical_{primary}"].notna().any():
        return []
    out = []
    for fraction, rows in part.groupby("fraction"):
        value = with_ci(*(rows[f"classical_{primary}{s}"].mean() for s in ("", "_lo", "_hi")))
        out.append(f"Classical baseline (linear model on pooled voxels), fraction {fraction:g}: {primary} = {value}")
    return [""] + out


def axis_label(task: str, metric: str) -> str:
    """A metric as an axis reads it, with its unit: ``MAE (years)`` for an error on age."""
    words = METRIC_WORDS.get(metric, metric)
    in_years = metric == "mae" and get_task(task).column == "age"
    return f"{words} (years)" if in_years else words


def plot_fractions(summary: pd.DataFrame, out: Path) -> list[Path]:
    """Per task: primary metric vs the number of training subjects (per fold, mean over folds and seeds; the
    training fraction for results that predate the count), a line per init, a panel per backbone."""
    paths = []
    for task, part in summary.groupby("task", sort=False):
        primary = part["primary"].iloc[0]
        x = "n_train_subjects" if "n_train_subjects" in part and part["n_train_subjects"].notna().all() else "fraction"
        backbones = list(dict.fromkeys(part["backbone"]))
        fig, axes = plt.subplots(1, len(backbones), figsize=(4.5 * len(backbones), 3.6), squeeze=False)
        for ax, bb in zip(axes[0], backbones):
            sub = part[part["backbone"] == bb]
            for init, line in sub.groupby("init", sort=False):
                line = line.sort_values(x)
                lo = (line[primary] - line.get(f"{primary}_lo", line[primary])).clip(lower=0)
                hi = (line.get(f"{primary}_hi", line[primary]) - line[primary]).clip(lower=0)
                ax.errorbar(
                    line[x],
                    line[primary],
                    yerr=[lo.fillna(0), hi.fillna(0)],
                    marker="o",
                    capsize=3,
                    label=init,
                )
            base = sub.get(f"baseline_{primary}")
            if base is not None and base.notna().any():
                ax.axhline(base.mean(), color="grey", linestyle="--", label="trivial baseline")
            ax.set_xscale("log")
            ticks = sorted(sub[x].unique())
            ax.set_xticks(ticks, [f"{t:.0f}" if x == "n_train_subjects" else f"{t:g}" for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("training subjects (per fold)" if x == "n_train_subjects" else "training fraction")
            ax.set_ylabel(axis_label(task, primary))
            ax.set_title(f"{task} — {bb}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{task}_{primary}_vs_fraction.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_sites(results: pd.DataFrame, out_dir: Path, out: Path) -> list[Path]:
    """Per task: primary metric per site at the largest training fraction, bars per (backbone, init)."""
    paths = []
    for task, part in results.groupby("task", sort=False):
        primary = part["primary"].iloc[0]
        top = part[part["fraction"] == part["fraction"].max()]
        frames = []
        for _, row in top.iterrows():
            path = out_dir / row["run_dir"] / "per_site.csv"
            if path.is_file() and path.stat().st_size > 1:
                site = pd.read_csv(path)
                if primary in site and "site" in site:
                    frames.append(site.assign(model=f"{row['backbone']}/{row['init']}")[["site", "model", primary]])
        if not frames:
            continue
        table = pd.concat(frames).groupby(["site", "model"])[primary].mean().unstack("model")
        ax = table.plot.bar(figsize=(max(4.5, 1.2 * len(table) * max(1, table.shape[1]) / 2), 3.6), rot=0)
        ax.set_ylabel(axis_label(task, primary))
        ax.set_title(f"{task}: {primary} per site (fraction {top['fraction'].iloc[0]:g})")
        ax.legend(fontsize=7)
        ax.figure.tight_layout()
        path = out / f"{task}_per_site.png"
        ax.figure.savefig(path, dpi=110)
        plt.close(ax.figure)
        paths.append(path)
    return paths


def write_report(
    results: pd.DataFrame, out_dir: str | Path, metrics: list[str] | None = None, gains: str = ""
) -> pd.DataFrame:
    """Write results.csv, results.md (followed by ``gains``, the paired gains' section of ``finetune.gains.markdown``),
    plots/*.png and tb/ summary scalars; returns the per-cell summary."""
    out_dir = Path(out_dir)
    results.to_csv(out_dir / "results.csv", index=False)
    if results.empty:
        (out_dir / "results.md").write_text("# Fine-tuning results\n\nNo finished cells.\n")
        return results
    summary = summarise(results)
    text = markdown(summary, metrics)
    (out_dir / "results.md").write_text(text + "\n" + gains)
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    plot_fractions(summary, plots)
    plot_sites(results, out_dir, plots)
    with RankZeroWriter(out_dir / "tb") as tb:
        for _, row in summary.iterrows():
            tag = f"{row['task']}/{row['backbone']}/{row['init']}/{row['primary']}"
            if np.isfinite(row[row["primary"]]):
                tb.add_scalar(tag, float(row[row["primary"]]), int(round(row["fraction"] * 100)))
    return summary
