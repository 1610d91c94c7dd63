"""Paired gains: is an init better than scratch (or than the classical baseline) on the same test subjects?

For every task × backbone × fraction × init, the gain is the primary metric's paired difference against a
reference on the same test subjects, splits and seeds — positive = better, also for MAE — averaged over seeds.
Its 95 % CI is a paired bootstrap over test subjects pooled over seeds: a resample draws subjects with
replacement and weights each of their test rows (in every seed) by how often they were drawn, so both models
are scored on the same resampled subjects. The verdict follows the CI: ``helps`` (above 0), ``hurts`` (below 0),
``inconclusive`` (contains 0) — unless the comparison rests on too little to mean anything, then it is ``too_few``:
fewer test subjects than the grid's ``min_test_subjects`` (default 20), or one seed where the grid has several.
Test subjects are counted per seed, over all its folds — in k-fold every subject (each is tested once), in a
hold-out the test split — and the fewest of any seed count (``n_test_subjects``). References: ``scratch`` (the same
backbone from random weights) and ``classical`` (``finetune.classical`` on the same folds). Written as
``gains.csv`` beside ``results.csv``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

GAIN_COLUMNS = [
    "task",
    "backbone",
    "fraction",
    "init",
    "metric",
    "reference",
    "reference_value",
    "value",
    "gain",
    "ci_low",
    "ci_high",
    "verdict",
    "n_seeds",
    "n_subjects",
    "n_test_subjects",
]
ROW_KEY = ["seed", "fold", "subject_id", "path"]  # one test row: an image of a subject in a fold of a seed


def verdict(low: float, high: float, too_few: bool = False) -> str:
    """``too_few`` when the comparison rests on too little (``gains.too_few``), else ``helps`` when the CI lies
    above 0, ``hurts`` below, else ``inconclusive``."""
    if too_few:
        return "too_few"
    if np.isfinite(low) and low > 0:
        return "helps"
    if np.isfinite(high) and high < 0:
        return "hurts"
    return "inconclusive"


def _auc_matrix(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # (n_pos, n_neg) Mann-Whitney kernel: 1 where the positive scores higher, 0.5 on ties
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    diff = score[pos][:, None] - score[neg][None, :]
    return pos, neg, (diff > 0) + 0.5 * (diff == 0)


def seed_metric(metric: str, y: np.ndarray, out: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The metric on one seed's test rows under each row of ``weights`` (B, n) -> (B,): ``roc_auc`` (binary,
    ``out`` = P(class 1)) or ``mae``."""
    if metric == "mae":
        return (weights * np.abs(out - y)).sum(1) / weights.sum(1)
    if metric == "roc_auc":
        pos, neg, kernel = _auc_matrix(y, out)
        wp, wn = weights[:, pos], weights[:, neg]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.einsum("bp,pn,bn->b", wp, kernel, wn) / (wp.sum(1) * wn.sum(1))
    raise ValueError(f"paired gains support roc_auc (binary) and mae, not {metric!r}")


def paired_gain(
    pairs: pd.DataFrame, metric: str, higher_is_better: bool, n_boot: int = 1000, seed: int = 0
) -> dict[str, float]:
    """``pairs``: one row per test row with ``seed, subject_id, y_true, model, reference`` (the two models'
    outputs). Returns value, reference_value (means over seeds), gain (signed: > 0 better) and its paired
    bootstrap 95 % CI over subjects pooled over seeds; ``n_subjects`` counts the subjects pooled over seeds,
    ``n_test_subjects`` those of the seed with the fewest."""
    subjects, subject_idx = np.unique(pairs["subject_id"].astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(subjects), np.full(len(subjects), 1 / len(subjects)), size=n_boot)  # (B, S)
    sign = 1.0 if higher_is_better else -1.0
    point, boot, values, refs = [], [], [], []
    for _, part in pairs.groupby("seed", sort=True):
        rows = subject_idx[part.index.to_numpy()]
        y = part["y_true"].to_numpy(float)
        ones = np.ones((1, len(part)))
        model = seed_metric(metric, y, part["model"].to_numpy(float), np.vstack([ones, draws[:, rows]]))
        ref = seed_metric(metric, y, part["reference"].to_numpy(float), np.vstack([ones, draws[:, rows]]))
        values.append(model[0])
        refs.append(ref[0])
        point.append(sign * (model[0] - ref[0]))
        boot.append(sign * (model[1:] - ref[1:]))
    boot_mean = np.nanmean(np.vstack(boot), axis=0) if boot else np.array([np.nan])
    low, high = np.nanpercentile(boot_mean, [2.5, 97.5]) if np.isfinite(boot_mean).any() else (np.nan, np.nan)
    return {
        "value": float(np.mean(values)),
        "reference_value": float(np.mean(refs)),
        "gain": float(np.mean(point)),
        "ci_low": float(low),
        "ci_high": float(high),
        "n_seeds": len(point),
        "n_subjects": len(subjects),
        "n_test_subjects": int(pairs.groupby("seed")["subject_id"].nunique().min()),
    }


def _test_outputs(path: Path, metric: str) -> pd.DataFrame:
    table = pd.read_csv(path)
    table = table[table["split"] == "test"]
    out = "prob_1" if metric == "roc_auc" else "y_pred"
    keep = [c for c in ("fold", "subject_id", "path", "y_true") if c in table]
    return table[keep].assign(output=table[out].to_numpy(float))


def _pairs(out_dir: Path, model: pd.DataFrame, reference: pd.DataFrame, file: str, ref_file: str, metric: str):
    if list(model["seed"]) != list(reference["seed"]):
        raise ValueError(f"paired cells must share their seeds: {list(model['seed'])} vs {list(reference['seed'])}")
    frames = []
    for (_, m), (_, r) in zip(model.iterrows(), reference.iterrows()):
        a = _test_outputs(out_dir / m["run_dir"] / file, metric).assign(seed=m["seed"])
        b = _test_outputs(out_dir / r["run_dir"] / ref_file, metric).assign(seed=r["seed"])
        key = [c for c in ROW_KEY if c in a and c in b]
        merged = a.merge(b[key + ["output"]], on=key, suffixes=("", "_ref"), validate="one_to_one")
        if len(merged) != len(a) or len(merged) != len(b):
            raise ValueError(f"{m['run_dir']} and {r['run_dir']} were tested on different subjects")
        frames.append(merged.rename(columns={"output": "model", "output_ref": "reference"}))
    return pd.concat(frames, ignore_index=True)


def too_few(gain: dict, min_test_subjects: int, grid_seeds: int) -> bool:
    """Whether a gain rests on too little for a verdict: fewer than ``min_test_subjects`` test subjects in a seed,
    or one seed where the grid has several."""
    return gain["n_test_subjects"] < min_test_subjects or (gain["n_seeds"] == 1 and grid_seeds > 1)


def compute_gains(
    results: pd.DataFrame, out_dir: str | Path, min_test_subjects: int, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """``gains.csv``'s rows from the grid's ``results.csv`` frame and its cells' prediction files: every init
    against scratch (same backbone) and against the classical baseline (same folds); ``too_few`` where a
    comparison has fewer than ``min_test_subjects`` test subjects or one of the grid's several seeds."""
    from finetune.run import CLASSICAL_FILE  # run imports the models; keep this module light to import

    out_dir = Path(out_dir)
    rows = []
    if results.empty:
        return pd.DataFrame(columns=GAIN_COLUMNS)
    grid_seeds = results["seed"].nunique()
    for (task, backbone, fraction), part in results.groupby(["task", "backbone", "fraction"], sort=False):
        metric, higher = part["primary"].iloc[0], bool(part["higher_is_better"].iloc[0])
        if metric not in ("roc_auc", "mae") or (metric == "roc_auc" and "prob_2" in _columns(out_dir, part)):
            continue  # paired gains cover binary ROC-AUC and MAE
        scratch = part[part["init"] == "scratch"].sort_values("seed")
        for init, cells in part.groupby("init", sort=False):
            cells = cells.sort_values("seed")
            comparisons = []  # (reference, the init's cells, the reference's cells, its prediction file)
            if init != "scratch" and len(scratch):  # on the seeds both have
                common = sorted(set(cells["seed"]) & set(scratch["seed"]))
                shared = cells[cells["seed"].isin(common)]
                comparisons.append(("scratch", shared, scratch[scratch["seed"].isin(common)], "predictions.csv"))
            comparisons.append(("classical", cells, cells, CLASSICAL_FILE))  # every seed: it ran in the same cells
            for reference, model_cells, ref_cells, ref_file in comparisons:
                if not all((out_dir / d / ref_file).is_file() for d in ref_cells["run_dir"]):
                    continue  # e.g. a grid run with classical_pool=0
                pairs = _pairs(out_dir, model_cells, ref_cells, "predictions.csv", ref_file, metric)
                gain = paired_gain(pairs, metric, higher, n_boot=n_boot, seed=seed)
                rows.append(
                    {
                        "task": task,
                        "backbone": backbone,
                        "fraction": fraction,
                        "init": init,
                        "metric": metric,
                        "reference": reference,
                        **gain,
                        "verdict": verdict(
                            gain["ci_low"], gain["ci_high"], too_few(gain, min_test_subjects, grid_seeds)
                        ),
                    }
                )
    return pd.DataFrame(rows, columns=GAIN_COLUMNS)


def _columns(out_dir: Path, part: pd.DataFrame) -> list[str]:
    return list(pd.read_csv(out_dir / part["run_dir"].iloc[0] / "predictions.csv", nrows=1).columns)


def markdown(gains: pd.DataFrame, min_test_subjects: int) -> str:
    """The gains as a markdown section (empty string when there are none); a line says why a verdict is
    ``too_few`` where one is."""
    if gains.empty:
        return ""
    lines = [
        "## Paired gains",
        "",
        "Gain = the init's primary metric minus the reference's on the same test subjects, splits and seeds "
        "(positive = better, also for MAE); 95 % paired-bootstrap CI over test subjects pooled over seeds; "
        "verdict from the CI.",
        "",
        "| task | backbone | fraction | init | metric | reference | reference value | value | gain (95 % CI) "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in gains.iterrows():
        lines.append(
            f"| {r['task']} | {r['backbone']} | {r['fraction']:g} | {r['init']} | {r['metric']} | {r['reference']} "
            f"| {r['reference_value']:.3f} | {r['value']:.3f} | {r['gain']:+.3f} [{r['ci_low']:+.3f}, "
            f"{r['ci_high']:+.3f}] | {r['verdict']} |"
        )
    if (gains["verdict"] == "too_few").any():
        lines += [
            "",
            f"`too_few`: no verdict — fewer than {min_test_subjects} test subjects in a seed (k-fold: every subject "
            "tested over the folds; hold-out: the test split), or one seed where the grid has several; the gain and "
            "its CI are shown but do not support a conclusion (`min_test_subjects` sets the minimum).",
        ]
    return "\n".join(lines) + "\n"
