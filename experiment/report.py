"""``report.md`` of an experiment: what ran, pre-training losses, in-site and out-of-site tables, the gain of each
pre-trained init over scratch, learning curves, and what the numbers can and cannot say."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from common.checkpoint import read_export_metadata
from common.io import atomic_write_text
from experiment.config import ExperimentConfig
from finetune.gains import markdown as gains_markdown
from finetune.report import markdown, summarise

EXPORT = Path("export") / "encoder.safetensors"  # a pre-training run's encoder, inside its run folder


def _last_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}


def _pretrain_table(cfg: ExperimentConfig, pretrain_dirs: dict[str, Path]) -> list[str]:
    """What each pre-training run made (wall times are in the stage table: this table is the same on a rerun)."""
    lines = [
        "| init | corpus | objective | backbone | steps | final loss |",
        "|---|---|---|---|---|---|",
    ]
    for spec in cfg.pretrain:
        meta = read_export_metadata(pretrain_dirs[spec.name] / EXPORT)
        loss = _last_metrics(pretrain_dirs[spec.name]).get("loss")
        lines.append(
            f"| {spec.name} | {meta.get('corpus', spec.corpus)} | {meta.get('objective', '?')} | "
            f"{meta['arch']['name']} ({spec.backbone}) | {meta.get('step', '?')} | "
            f"{'–' if loss is None else f'{loss:.4f}'} |"
        )
    return lines


def gains_over_scratch(summary: pd.DataFrame) -> pd.DataFrame:
    """Per task, backbone and fraction: each pre-trained init's primary metric minus scratch's, signed so that
    positive means better (an MAE in years that falls is a positive gain)."""
    rows = []
    for (task, backbone, fraction), part in summary.groupby(["task", "backbone", "fraction"], sort=False):
        scratch = part[part["init"] == "scratch"]
        if scratch.empty:
            continue
        primary = part["primary"].iloc[0]
        sign = 1.0 if bool(part["higher_is_better"].iloc[0]) else -1.0
        base = float(scratch[primary].iloc[0])
        for _, row in part[part["init"] != "scratch"].iterrows():
            rows.append(
                {
                    "task": task,
                    "backbone": backbone,
                    "fraction": fraction,
                    "init": row["init"],
                    "metric": primary,
                    "scratch": base,
                    "pretrained": float(row[primary]),
                    "gain": sign * (float(row[primary]) - base),
                }
            )
    return pd.DataFrame(rows)


def _gains_md(gains: pd.DataFrame) -> list[str]:
    if gains.empty:
        return ["(no pre-trained init was evaluated)"]
    lines = [
        "| task | backbone | fraction | init | metric | scratch | pre-trained | gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in gains.iterrows():
        lines.append(
            f"| {r['task']} | {r['backbone']} | {r['fraction']:g} | {r['init']} | {r['metric']} | "
            f"{r['scratch']:.3f} | {r['pretrained']:.3f} | {r['gain']:+.3f} |"
        )
    return lines


def _paired_gains(gains_csv: Path, summary: pd.DataFrame, min_test_subjects: int) -> list[str]:
    """The grid's paired gains (``finetune.gains``: CI and verdict, ``too_few`` below ``min_test_subjects``), or the
    unpaired differences when the grid predates them."""
    if not gains_csv.is_file() or gains_csv.stat().st_size < 2:
        return _gains_md(gains_over_scratch(summary))
    table = gains_markdown(pd.read_csv(gains_csv), min_test_subjects).splitlines()
    return table[2:] if table else ["(no paired gains)"]  # without its own heading


def _tables(results_csv: Path) -> tuple[pd.DataFrame | None, str]:
    """The grid's summary and its markdown tables, headings moved one level down (the report has its own title)."""
    if not results_csv.is_file():
        return None, "(not run)"
    summary = summarise(pd.read_csv(results_csv))
    lines = [line for line in markdown(summary).splitlines() if not line.startswith("# ")]
    return summary, "\n".join("#" + line if line.startswith("## ") else line for line in lines)


def _in_site_words(cfg: ExperimentConfig) -> str:
    p = cfg.grid.base.protocol
    if cfg.in_site_scheme == "holdout":
        return f"one subject-level hold-out per seed ({p.test_fraction:.0%} test)"
    return f"{p.folds}-fold subject-level CV"


def write_experiment_report(
    cfg: ExperimentConfig,
    out: Path,
    timings: dict[str, float],
    pretrain_dirs: dict[str, Path],
    grid_dirs: dict[str, Path],
) -> Path:
    """Write ``out/report.md`` from the config, stage wall times (stage -> seconds), each pre-training run's
    folder (by pretrain entry name) and the grids' folders (``in_site``, ``out_of_site``)."""
    s = cfg.synth
    data = cfg.grid.base.data
    total = sum(v for v in timings.values())
    lines = [
        "# neurotransfer experiment report",
        "",
        "Which initialisation makes a 3D ViT or CNN best at AD, PD and brain-age prediction, on synthetic cohorts "
        "with a known ground truth?"
        if not cfg.cohorts
        else "Which initialisation makes a 3D ViT or CNN best at your cohorts' tasks "
        f"({', '.join([*s.cohorts, *cfg.cohorts])})?",
        "",
        "## What ran",
        "",
        f"- Synthetic pre-training corpus: {s.corpus_n} volumes ({s.contrast} contrast) at {cfg.spacing:g} mm."
        if any(p.corpus == "synthmri" for p in cfg.pretrain)
        else "- No synthetic pre-training corpus.",
        "- Labelled cohorts: "
        + ", ".join(
            [f"{t} {c.n} subjects over {c.sites} sites" for t, c in s.cohorts.items()]
            + [f"{t} from {Path(m).name}" for t, m in cfg.cohorts.items()]
        )
        + f"; held-out site(s) for the out-of-site test: {', '.join(cfg.ood_sites)}.",
        f"- Video corpus: {cfg.video.count} synthetic clips of moving, deforming shapes "
        f"({cfg.video.frames} frames, {cfg.video.height}×{cfg.video.width})."
        if any(p.corpus == "video" for p in cfg.pretrain)
        else "- No video pre-training.",
        f"- Model input: {list(data.shape)} voxels at {list(data.spacing)} mm; fine-tuning mode "
        f"`{cfg.grid.base.train.mode}`, {_in_site_words(cfg)} in-site; "
        f"training fractions {list(cfg.grid.fractions)}; seeds {list(cfg.grid.seeds)}.",
        "- Backbones: "
        + ", ".join(f"`{b.label}` = {b.name} {dict(b.kwargs) or ''}".strip() for b in cfg.grid.backbones)
        + ".",
        "",
        "Stage wall times (this run; stages skipped because their outputs existed are not counted):",
        "",
        "| stage | wall time |",
        "|---|---|",
        *[f"| {k} | {v:.0f} s |" for k, v in timings.items()],
        f"| **total** | **{total:.0f} s** ({total / 60:.1f} min) |",
        "",
        "## Pre-training",
        "",
        *_pretrain_table(cfg, pretrain_dirs),
        "",
    ]
    in_summary, in_tables = _tables(grid_dirs["in_site"] / "results.csv")
    lines += [f"## In-site results ({_in_site_words(cfg)} over all sites)", "", in_tables, ""]
    if in_summary is not None:
        lines += [
            "### Gain of each pre-trained init over scratch and over the classical baseline (paired)",
            "",
            *_paired_gains(grid_dirs["in_site"] / "gains.csv", in_summary, cfg.grid.min_test_subjects),
            "",
        ]
        lines += ["### Learning curves", ""]
        for png in sorted((grid_dirs["in_site"] / "plots").glob("*_vs_fraction.png")):
            lines.append(f"![{png.stem}]({os.path.relpath(png, out)})")
        lines.append("")
    if cfg.ood:
        ood_summary, ood_tables = _tables(grid_dirs["out_of_site"] / "results.csv")
        lines += [
            f"## Out-of-site results (trained on the other sites, tested on {', '.join(cfg.ood_sites)})",
            "",
            ood_tables,
            "",
        ]
        if ood_summary is not None:
            lines += [
                "### Gain over scratch and over the classical baseline on the held-out site(s) (paired)",
                "",
                *_paired_gains(grid_dirs["out_of_site"] / "gains.csv", ood_summary, cfg.grid.min_test_subjects),
                "",
            ]
            for png in sorted((grid_dirs["out_of_site"] / "plots").glob("*_per_site.png")):
                lines.append(f"![{png.stem}]({os.path.relpath(png, out)})")
            lines.append("")
    lines += [
        "## What this can and cannot show",
        "",
        "- The cohorts are synthetic: the disease and ageing effects are the generator's (known, configurable) "
        "effects, not real pathology, and sites differ by the generator's scanner profiles. A gain here says a "
        "pre-training source helps find these effects, not that it helps on ADNI, PPMI or UK Biobank."
        if not cfg.cohorts
        else f"- Your cohorts ({', '.join(cfg.cohorts)}) are what the gains are measured on; a gain holds for "
        "scans like theirs (sites, scanners, preprocessing) and says nothing about a clinical use.",
        "- Confidence intervals are bootstrap intervals over test subjects; with few subjects, seeds and folds "
        "they are wide, and differences inside them are not evidence of an effect.",
        "- At quickstart size the models, corpora and pre-training runs are tiny; the ranking of inits can change "
        "with longer pre-training and other label budgets (`configs/experiment/transfer.yaml`).",
        "",
    ]
    return atomic_write_text(out / "report.md", "\n".join(lines))
