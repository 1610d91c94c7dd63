"""``report.md`` of an experiment: what ran, pre-training losses, each generated cohort's oracle ceiling and domain
gap to the corpus, in-site and
out-of-site tables, the gain of each pre-trained init over scratch, learning curves, which head start the cells
chose, and what the numbers can and cannot say."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from common.checkpoint import read_export_metadata
from common.io import atomic_write_text
from experiment.config import ExperimentConfig
from experiment.oracle import ORACLE_FOLDS, ORACLE_SEEDS
from finetune.gains import markdown as gains_markdown
from finetune.metrics import with_ci
from finetune.modes.full import HEAD_STARTS
from finetune.report import markdown, summarise
from finetune.run import METRICS_FILE

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


def _oracle_md(cfg: ExperimentConfig, oracle: dict[str, dict]) -> list[str]:
    """Each generated cohort's oracle ceiling (``experiment.oracle``), and what it bounds."""
    if not oracle:
        return []
    lines = [
        "## Oracle ceiling: what a perfect volumetric pipeline reaches",
        "",
        "A linear model on each generated cohort's true regional volumes (its label maps' volumes / ICV; age and sex "
        "as covariates for a diagnosis): logistic regression or ridge, "
        f"{ORACLE_FOLDS}-fold stratified CV × {len(ORACLE_SEEDS)} seeds, 95 % bootstrap CI over subjects. It is "
        "what a segmentation without error followed by the usual volumetric analysis reaches; an image model can "
        "pass it only by reading what the regional volumes do not hold.",
        "",
        "| cohort | fine-tuned | metric | oracle (95 % CI) | subjects |",
        "|---|---|---|---|---|",
    ]
    for task, c in oracle.items():
        spec = cfg.synth.cohorts.get(task)
        tuned = "yes" if spec is None or spec.finetune else "no (oracle only)"
        value = with_ci(c["value"], c["ci_low"], c["ci_high"])
        lines.append(f"| {task} | {tuned} | {c['metric']} | {value} | {c['n_subjects']} |")
    if "pd" in oracle:
        lines += [
            "",
            "PD's effect in the generator is a shrinkage of the midbrain and putamen (and slightly larger ventricles), "
            "which these volumes hold without error: no init is expected to gain above this ceiling "
            f"({oracle['pd']['metric']} {oracle['pd']['value']:.3f}).",
        ]
    return [*lines, ""]


def _domain_gap_md(gaps: dict[str, dict]) -> list[str]:
    """How well classifiers tell the corpus's volumes from each generated cohort's (``synth.gap``)."""
    if not gaps:
        return []
    lines = [
        "## Domain gap between the pre-training corpus and each cohort",
        "",
        "Cross-validated logistic regressions telling the corpus's volumes from the cohort's (`synth.gap`): on "
        "voxels pooled to 8 mm (anatomy, contrast, artefacts) and on each volume's brain-intensity histogram "
        "(contrast, noise, artefacts). ROC-AUC 0.5: the two cannot be told apart; 1.0: every volume gives its source "
        "away. Cohorts of the corpus's own generator need not be at 0.5 either: their ages, diagnoses and scanner "
        "sites can differ from the corpus's.",
        "",
        "| cohort | volumes (corpus / cohort) | voxels ROC-AUC | voxels balanced accuracy | histogram ROC-AUC |",
        "|---|---|---|---|---|",
    ]
    for task, g in gaps.items():
        lines.append(
            f"| {task} | {g['n_a']} / {g['n_b']} | {g['voxels']['roc_auc']:.3f} | "
            f"{g['voxels']['balanced_accuracy']:.3f} | {g['histogram']['roc_auc']:.3f} |"
        )
    return [*lines, ""]


def head_choices(grid_dir: Path) -> pd.DataFrame:
    """Per task, backbone and init of a grid: how many folds kept each head start (``train.head_init=choose``,
    ``finetune.modes.full``); empty when no cell chose."""
    results = grid_dir / "results.csv"
    if not results.is_file() or results.stat().st_size < 2:
        return pd.DataFrame()
    rows = []
    for _, cell in pd.read_csv(results).iterrows():
        for fold in json.loads((grid_dir / cell["run_dir"] / METRICS_FILE).read_text())["folds"]:
            if "head_val_scores" in fold:
                rows.append({"task": cell["task"], "backbone": cell["backbone"], "init": cell["init"], **fold})
    if not rows:
        return pd.DataFrame()
    counts = pd.crosstab([pd.DataFrame(rows)[k] for k in ("task", "backbone", "init")], pd.DataFrame(rows)["head_init"])
    return counts.reindex(columns=list(HEAD_STARTS), fill_value=0).reset_index()


def _head_choices_md(grid_dirs: dict[str, Path]) -> list[str]:
    tables = {name: head_choices(path) for name, path in grid_dirs.items()}
    tables = {name: t for name, t in tables.items() if not t.empty}
    if not tables:
        return []
    lines = [
        "## Head start chosen on validation subjects",
        "",
        "`train.head_init: choose`: every fold was fine-tuned from a random head and from the linear probe's (LP-FT), "
        "with the same seed, rows and batch order, and the model whose best validation score was higher predicted the "
        "test subjects. Folds that kept each start:",
        "",
        "| grid | task | backbone | init | " + " | ".join(HEAD_STARTS) + " |",
        "|---|---|---|---|" + "---|" * len(HEAD_STARTS),
    ]
    for name, table in tables.items():
        for _, r in table.iterrows():
            counts = " | ".join(str(int(r[start])) for start in HEAD_STARTS)
            lines.append(f"| {name.replace('_', '-')} | {r['task']} | {r['backbone']} | {r['init']} | {counts} |")
    return [*lines, ""]


def _cohort_words(cfg: ExperimentConfig) -> str:
    s = cfg.synth
    generated = [
        f"{t} {c.n} subjects over {c.sites} sites" + ("" if c.finetune else " (oracle only, not fine-tuned)")
        for t, c in s.cohorts.items()
    ]
    source = [f"`{s.cohort_config}`"] if s.cohort_config else []
    source += [f"`{item}`" for item in s.cohort_overrides]
    if s.cohorts and source:
        generated[0] = f"generated from {' + '.join(source)}, not the corpus's generator settings: {generated[0]}"
    own = [f"{t} from {Path(m).name}" for t, m in cfg.cohorts.items()]
    return "- Labelled cohorts: " + ", ".join(generated + own)


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
    oracle: dict[str, dict] | None = None,
    domain_gaps: dict[str, dict] | None = None,
) -> Path:
    """Write ``out/report.md`` from the config, stage wall times (stage -> seconds), each pre-training run's
    folder (by pretrain entry name), the grids' folders (``in_site``, ``out_of_site``), the generated cohorts'
    oracle ceilings (task -> ``experiment.oracle.oracle_ceiling``) and their domain gaps to the corpus (task ->
    ``synth.gap.domain_gap``)."""
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
        _cohort_words(cfg) + f"; held-out site(s) for the out-of-site test: {', '.join(cfg.ood_sites)}.",
        f"- Video corpus: {cfg.video.count} synthetic clips of moving, deforming shapes "
        f"({cfg.video.frames} frames, {cfg.video.height}×{cfg.video.width})."
        if any(p.corpus == "video" for p in cfg.pretrain)
        else "- No video pre-training.",
        f"- Model input: {list(data.shape)} voxels at {list(data.spacing)} mm; fine-tuning mode "
        f"`{cfg.grid.base.train.mode}` (head start `{cfg.grid.base.train.head_init}`), {_in_site_words(cfg)} in-site; "
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
        *_oracle_md(cfg, oracle or {}),
        *_domain_gap_md(domain_gaps or {}),
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
    lines += _head_choices_md(grid_dirs)
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
