"""Evidence for ``docs/synth.md``: a montage of synthetic subjects and the measured plausibility checks.

    python -m synth.report --cohorts DIR [--n 60] [--img docs/img] [--workers W]

Writes ``synth_montage.png`` (middle axial / coronal / sagittal slices: one subject young and old, with AD and
with PD, on another site's scanner, and in random contrast), ``synth_labels.png`` (a label map) and
``synth_plausibility.png`` (ventricles vs age, hippocampi CN vs AD), generates 2 mm cohorts under ``DIR`` with
the real CLI pipeline (resumable), and prints the checks as a Markdown table.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from scipy.stats import mannwhitneyu, spearmanr  # noqa: E402

from synth.atrophy import sample_effects  # noqa: E402
from synth.cohort import Job, default_workers, generate  # noqa: E402
from synth.config import SynthConfig  # noqa: E402
from synth.dataset import GeneratedDirectory  # noqa: E402
from synth.generator import Generator  # noqa: E402
from synth.subject import cohort_plan, corpus_plan, site_profile  # noqa: E402


def _slices(image: np.ndarray) -> list[np.ndarray]:
    # (D, H, W) = (x, y, z) RAS -> axial (x-y at mid z), coronal (x-z), sagittal (y-z); anterior and superior
    # are shown up
    d, h, w = image.shape
    return [image[:, :, w // 2].T, image[:, h // 2, :].T, image[d // 2, :, :].T]


def montage(path: Path, spacing: float = 1.0, seed: int = 4) -> None:
    cfg = SynthConfig(spacing=spacing)
    gen = Generator(cfg)
    base = cohort_plan(cfg, "ad", seed, 0, 2)

    def as_(plan, age, diagnosis):
        return replace(
            plan,
            age=age,
            diagnosis=diagnosis,
            effects=sample_effects(cfg.atrophy, age, diagnosis, np.random.default_rng(plan.index)),
        )

    other_site = replace(base, site="site1", scanner=site_profile(cfg, seed, 1))
    random_cfg = replace(cfg, contrast="random")
    rows = [
        ("CN, 25 y, site0, t1", gen, as_(base, 25.0, "CN")),
        ("CN, 85 y, site0, t1", gen, as_(base, 85.0, "CN")),
        ("AD, 85 y, site0, t1", gen, as_(base, 85.0, "AD")),
        ("PD, 85 y, site0, t1", gen, as_(base, 85.0, "PD")),
        ("CN, 85 y, site1, t1", gen, as_(other_site, 85.0, "CN")),
        ("CN, random contrast", Generator(random_cfg), corpus_plan(random_cfg, seed, 3)),
        ("CN, random contrast", Generator(random_cfg), corpus_plan(random_cfg, seed, 5)),
    ]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3.1 * len(rows)), facecolor="black")
    for r, (title, g, plan) in enumerate(rows):
        image = g(plan).image[0].numpy()
        for c, sl in enumerate(_slices(image)):
            ax = axes[r, c]
            ax.imshow(sl, origin="lower", cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_axis_off()
        axes[r, 0].set_title(title, color="white", loc="left", fontsize=10)
    for c, name in enumerate(("axial", "coronal", "sagittal")):
        axes[0, c].set_title(
            f"{rows[0][0]}  |  {name}" if c == 0 else name,
            color="white",
            fontsize=10,
            loc="left" if c == 0 else "center",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=80, facecolor="black")
    plt.close(fig)


def label_figure(path: Path, spacing: float = 1.0, seed: int = 4) -> None:
    cfg = SynthConfig(spacing=spacing)
    vol = Generator(cfg)(cohort_plan(cfg, "ad", seed, 1, 2), with_labels=True)
    image, labels = vol.image[0].numpy(), vol.labels.numpy()
    d, h, w = labels.shape
    # slices through the regions: axial at the hippocampi/midbrain, coronal through the hippocampi
    z = int(round((-12 - vol.affine[2, 3]) / spacing))
    y = int(round((-22 - vol.affine[1, 3]) / spacing))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), facecolor="black")
    cmap = plt.get_cmap("tab20", 20)
    for ax, img, lab, title in (
        (axes[0], image[:, :, z].T, labels[:, :, z].T, "axial z=-12 mm"),
        (axes[1], image[:, y, :].T, labels[:, y, :].T, "coronal y=-22 mm"),
        (axes[2], image[d // 2 - 25, :, :].T, labels[d // 2 - 25, :, :].T, "sagittal x=-25 mm"),
    ):
        ax.imshow(img, origin="lower", cmap="gray", vmin=0, vmax=1)
        ax.imshow(
            np.ma.masked_less(lab, 4),
            origin="lower",
            cmap=cmap,
            vmin=0,
            vmax=19,
            alpha=0.7,
            interpolation="nearest",
        )
        ax.set_title(title + "  (regions coloured)", color="white", fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=80, facecolor="black")
    plt.close(fig)


def tissue_order(folder: Path) -> tuple[float, list[float]]:
    """Share of subjects with WM > GM > CSF (label-wise mean intensity) and the mean (CSF, GM, WM) intensities."""
    ds = GeneratedDirectory(folder, with_labels=True)
    ok, means = 0, []
    for i in range(len(ds)):
        item = ds[i]
        m = [float(item["image"][0][item["label"] == k].mean()) for k in (1, 2, 3)]
        means.append(m)
        ok += m[2] > m[1] > m[0]
    return ok / len(ds), list(np.mean(means, axis=0))


def checks(root: Path, n: int, workers: int, img: Path) -> str:
    cfg = SynthConfig(spacing=2.0)
    frames = {}
    for task in ("brain_age", "ad", "pd"):
        out = root / f"{task}_2mm"
        generate(out, cfg, Job(seed=0, task=task, sites=3), n, workers=workers)
        frames[task] = pd.read_csv(out / "manifest.csv")
    ba, ad, pdf = frames["brain_age"], frames["ad"], frames["pd"]
    rho = spearmanr(ba["age"], ba["ventricle_ml"])
    rho_hip = spearmanr(ba["age"], ba["hippocampus_ml"])
    rows = [
        (
            "ventricle volume vs age (brain_age, CN 20-90)",
            f"Spearman rho = {rho.statistic:.2f}",
            f"p = {rho.pvalue:.1e}",
        ),
        (
            "hippocampal volume vs age (brain_age)",
            f"Spearman rho = {rho_hip.statistic:.2f}",
            f"p = {rho_hip.pvalue:.1e}",
        ),
    ]

    def group(df, col, a, b):
        x, y = df[df.diagnosis == a][col], df[df.diagnosis == b][col]
        p = mannwhitneyu(x, y).pvalue
        return (
            f"{a} {x.mean():.2f} mL, {b} {y.mean():.2f} mL ({100 * (y.mean() / x.mean() - 1):+.0f} %)",
            f"p = {p:.1e}",
        )

    rows.append(("hippocampal volume, CN vs AD", *group(ad, "hippocampus_ml", "CN", "AD")))
    rows.append(("ventricle volume, CN vs AD", *group(ad, "ventricle_ml", "CN", "AD")))
    rows.append(("midbrain volume, HC vs PD", *group(pdf, "midbrain_ml", "HC", "PD")))
    rows.append(("putamen volume, HC vs PD", *group(pdf, "putamen_ml", "HC", "PD")))
    share, means = tissue_order(root / "ad_2mm")
    rows.append(
        (
            "t1 contrast WM > GM > CSF (label-wise means)",
            f"{100 * share:.0f} % of {len(ad)} subjects",
            f"mean CSF {means[0]:.2f}, GM {means[1]:.2f}, WM {means[2]:.2f}",
        )
    )

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].scatter(ba["age"], ba["ventricle_ml"], s=12)
    axes[0].set_xlabel("age (years)")
    axes[0].set_ylabel("lateral ventricles (mL)")
    axes[0].set_title(f"brain_age cohort (n={len(ba)}): rho = {rho.statistic:.2f}")
    data = [ad[ad.diagnosis == d]["hippocampus_ml"] for d in ("CN", "AD")]
    axes[1].boxplot(data, tick_labels=["CN", "AD"])
    axes[1].set_ylabel("hippocampi (mL)")
    axes[1].set_title(f"ad cohort (n={len(ad)})")
    fig.tight_layout()
    fig.savefig(img / "synth_plausibility.png", dpi=80)
    plt.close(fig)
    lines = ["| check | measured | p (Spearman or Mann-Whitney) / detail |", "|---|---|---|"] + [
        f"| {a} | {b} | {c} |" for a, b, c in rows
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohorts", required=True, help="folder for the 2 mm check cohorts")
    parser.add_argument("--n", type=int, default=60, help="subjects per cohort")
    parser.add_argument("--img", default="docs/img")
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args()
    img = Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.workers)
    montage(img / "synth_montage.png")
    label_figure(img / "synth_labels.png")
    print(checks(Path(args.cohorts), args.n, args.workers, img))


if __name__ == "__main__":
    main()
