"""An export as a folder, the layout ``huggingface_hub`` and timm share: ``model.safetensors`` (our single-file
export, metadata in its header), ``config.json`` (the architecture with every constructor argument, the whole
preprocessing, provenance) and a generated ``README.md`` model card. A fine-tuned model (``finetune``) adds
``head.safetensors`` and a ``task`` in ``config.json``.

``common.checkpoint.load_export(FOLDER)`` and ``common.weights.load_backbone(model, "FOLDER")`` read it; the
weights file alone stays a complete export of the backbone. Nothing written names an absolute path: a folder is
shared by copying it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from common.checkpoint import FOLDER_WEIGHTS, export_backbone, read_export_metadata
from common.data.volume import PIPELINE
from common.errors import CheckpointError
from common.io import atomic_write
from common.weights.monai_vit import monai_load_snippet

CONFIG = "config.json"
CARD = "README.md"
HEAD = "head.safetensors"  # a fine-tuned model's task head (finetune.model_folder)
LIBRARY = "neurotransfer"
LAYOUT = "(B, C, D, H, W) float32, D/H/W the NIfTI i/j/k axes after reorientation"
# export metadata keys that config.json gathers under "preprocessing" (PreprocessConfig.describe's names)
PREPROCESSING_KEYS = ("input_size", "spacing", "intensity", "percentiles", "crop_foreground", "orientation")
MASKED_INTENSITIES = ("zscore", "percentile")  # the modes whose statistics are taken over PIPELINE's mask


def export_folder(
    model: nn.Module,
    folder: str | Path,
    metadata: Mapping[str, Any],
    metrics: str | Path | None = None,
    described: Mapping[str, str] | None = None,
    head: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``folder/{model.safetensors, config.json, README.md}`` (+ ``head.safetensors``), each file
    atomically, weights first.

    ``metadata`` is ``export_backbone``'s (``spacing``, ``intensity`` required; ``crop_foreground``,
    ``percentiles``, ``corpus``, ``objective``, ``step``, ``training_data``, ``license``, a fine-tuned model's
    ``task`` ... kept); ``metrics`` a ``metrics.jsonl`` whose loss curve the card summarises; ``described`` the
    card's words for the ``objective`` and ``corpus`` (``model_card``); ``head`` a task head's state dict.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder; an export folder cannot be written there")
    weights = export_backbone(model, folder / FOLDER_WEIGHTS, metadata)
    if head is not None:
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in head.items()}
        with atomic_write(folder / HEAD) as tmp:
            save_file(tensors, tmp)
    config = folder_config(read_export_metadata(weights), head=HEAD if head is not None else None)
    curve = loss_summary(metrics) if metrics is not None else None
    if curve:
        config["training"] = curve
    with atomic_write(folder / CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    with atomic_write(folder / CARD) as tmp:
        tmp.write_text(model_card(config, folder.name, described))
    return folder


def link_file(src: str | Path, dst: str | Path) -> Path:
    """``dst`` as a second name of ``src``'s bytes (a hard link; a copy where links are not possible), replaced
    atomically: an export folder's weights under the single-file name older readers open."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".tmp-link-{dst.name}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)
    return dst


def folder_config(meta: Mapping[str, Any], head: str | None = None) -> dict:
    """``config.json``: the export metadata with the preprocessing a user must reproduce gathered in one place.
    Metadata of an export written before a step was recorded (``crop_foreground``) gives ``null`` for it."""
    kwargs = meta["arch"].get("kwargs", {})
    size = meta.get("input_size", kwargs.get("img_size"))
    size = [size] * 3 if isinstance(size, int) else list(size)
    provenance = {k: v for k, v in meta.items() if k not in ("arch", *PREPROCESSING_KEYS)}
    intensity = meta["intensity"]
    return {
        "format": "neurotransfer-export",
        "weights": FOLDER_WEIGHTS,
        **({"head": head} if head else {}),
        "arch": meta["arch"],
        "input_size": size,
        "preprocessing": {
            "orientation": PIPELINE["orientation"],
            "spacing": meta["spacing"],
            "interpolation": PIPELINE["interpolation"],
            "crop_foreground": meta.get("crop_foreground"),
            "shape": size,
            "pad_crop": PIPELINE["pad_crop"],
            "intensity": intensity,
            "intensity_mask": PIPELINE["intensity_mask"] if intensity in MASKED_INTENSITIES else None,
            "percentiles": meta.get("percentiles") if intensity == "percentile" else None,
            "channels": kwargs.get("in_chans", 1),
            "layout": LAYOUT,
        },
        **provenance,
    }


def data_summary(df: pd.DataFrame) -> dict:
    """What a card says about training images: how many, of how many subjects and sites, and the age range
    (years), as far as the manifest's columns tell."""
    summary: dict = {"images": len(df)}
    for column, key in (("subject_id", "subjects"), ("site", "sites")):
        if column in df.columns:
            summary[key] = int(df[column].nunique())
    ages = pd.to_numeric(df["age"], errors="coerce").dropna() if "age" in df.columns else pd.Series(dtype=float)
    if len(ages):
        summary["age_range"] = [round(float(ages.min()), 1), round(float(ages.max()), 1)]
    return summary


def loss_summary(metrics: str | Path) -> dict | None:
    """First, lowest and last training loss of a ``metrics.jsonl`` (None when it has no loss)."""
    path = Path(metrics)
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
        if isinstance(row, dict) and isinstance(row.get("loss"), (int, float)) and math.isfinite(row["loss"]):
            rows.append(row)
    if not rows:
        return None
    best = min(rows, key=lambda r: r["loss"])
    tail = rows[-max(1, len(rows) // 10) :]  # the last tenth of the logged steps: less noisy than one step
    return {
        "logged_steps": len(rows),
        "first": {"step": rows[0]["step"], "loss": rows[0]["loss"]},
        "lowest": {"step": best["step"], "loss": best["loss"]},
        "last": {"step": rows[-1]["step"], "loss": rows[-1]["loss"]},
        "last_tenth_mean": sum(r["loss"] for r in tail) / len(tail),
    }


# ------------------------------------------------------------------------------------------------ the card
def model_card(config: Mapping[str, Any], where: str = "export", described: Mapping[str, str] | None = None) -> str:
    """The ``README.md`` of an export folder, written from its ``config.json``: YAML front matter (Hugging Face's
    model card fields), what the model is, intended use and limits, tested load snippets, the preprocessing, the
    training data and provenance. ``where`` is the folder's name as the snippets open it (relative: run them
    beside the folder); ``described`` words the ``objective`` and ``corpus`` (the descriptions pretrain registers
    with them: common does not know pretrain's names), a field it leaves out is named as recorded."""
    described = described or {}
    sections = [
        _front_matter(config),
        _summary(config, described),
        _intended_use(config),
        _load(config, where),
        _preprocessing(config["preprocessing"]),
        _training_data(config.get("training_data")),
        _task(config["task"]) if "task" in config else _pretraining(config),
    ]
    return "\n".join(line for section in sections for line in [*section, ""])


def _front_matter(config: Mapping[str, Any]) -> list[str]:
    task = config.get("task")
    tags = [LIBRARY, "medical-imaging", "brain-mri", "3d", config["arch"]["name"]]
    tags += ["fine-tuned", task["name"]] if task else ["self-supervised", str(config.get("objective", "unrecorded"))]
    fields = {
        "license": config.get("license", "other"),
        "library_name": LIBRARY,
        "tags": tags,
        "training_data": config.get("training_data") or "unrecorded",
    }
    return ["---", yaml.safe_dump(fields, sort_keys=False).rstrip(), "---"]


def _summary(config: Mapping[str, Any], described: Mapping[str, str]) -> list[str]:
    arch, task = config["arch"], config.get("task")
    version = config.get("package_version", "?")
    if task:
        what = ", ".join(task["classes"]) if task.get("classes") else f"{task['column']} (regression)"
        tuning = config.get("fine_tuning", {})
        return [
            f"# {arch['name']} fine-tuned for {task['name']}",
            "",
            f"A `{arch['name']}` backbone with a linear head predicting **{what}** from a 3D brain MRI, fine-tuned "
            f"(mode `{tuning.get('mode', '?')}`, fold {tuning.get('fold', '?')}) by neurotransfer {version}.",
        ]
    corpus, objective = config.get("corpus", "unrecorded"), config.get("objective", "unrecorded")
    step, steps = config.get("step"), config.get("steps")
    trained = f"{step} optimizer steps" + (f" of {steps} planned" if steps and steps != step else "")
    return [
        f"# {arch['name']} encoder for 3D brain MRI ({objective}, {corpus})",
        "",
        f"A `{arch['name']}` backbone pre-trained with **{described.get('objective', objective)}** on "
        f"**{described.get('corpus', corpus)}** (corpus `{corpus}`) for "
        + (trained if step is not None else "an unrecorded number of steps")
        + f", exported by neurotransfer {version}. It is the encoder only: no task head, to be fine-tuned or probed.",
    ]


def _intended_use(config: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Intended use and limits",
        "",
        "- **Research only, not for clinical use.** This is not a medical device: its outputs must not inform the "
        "diagnosis, treatment or care of any person.",
        "- It has seen only the training data summarised below. Scans from other scanners, sites, protocols, "
        "populations or age ranges may give unreliable outputs, and nothing here detects that.",
        "- Inputs must be preprocessed exactly as below; a differently preprocessed scan is another input.",
    ]
    if "task" in config:
        lines.append(
            "- Its performance is what its run's `metrics.json` reports on that run's test subjects, with their "
            "confidence intervals; it says nothing about other cohorts."
        )
    else:
        lines.append(
            "- Whether it helps a task is measured by fine-tuning (`python -m finetune benchmark`), not by its "
            "pre-training loss."
        )
    return lines


def _load(config: Mapping[str, Any], where: str) -> list[str]:
    arch, pre = config["arch"], config["preprocessing"]
    shape = ", ".join(map(str, pre["shape"]))
    kwargs = ", ".join(f"{k}={v!r}" for k, v in arch.get("kwargs", {}).items())
    lines = ["## Load it", "", "Run these beside the folder (they open it as `" + where + "`).", ""]
    if "task" in config:
        lines += [
            "Apply the whole model (backbone, head, decision threshold, bias correction) to new scans, preprocessed "
            "from their NIfTI files as below:",
            "",
            "```bash",
            f"python -m finetune predict --model {where} --manifest new.csv --out predictions.csv",
            "```",
            "",
        ]
    lines += [
        "With neurotransfer:",
        "",
        "```python",
        "from common.checkpoint import load_export",
        "",
        f'model, meta = load_export("{where}")  # the rebuilt backbone with these weights, and its metadata',
        "```",
        "",
        f"or give the folder as the init of a fine-tune (`python -m finetune run --init {where} ...`: the "
        f'architecture comes with it) or to `common.weights.load_backbone(model, "{where}")`. The architecture is '
        f'`create_backbone("{arch["name"]}", {kwargs})`.',
        "",
        "### plain torch + safetensors",
        "",
        "```python",
        "import json",
        "",
        "import torch",
        "from safetensors.torch import load_file",
        "",
        "from common.models import create_backbone  # the architecture's code",
        "",
        f'arch = json.load(open("{where}/config.json"))["arch"]  # every constructor argument',
        'model = create_backbone(arch["name"], **arch["kwargs"])',
        f'model.load_state_dict(load_file("{where}/model.safetensors"), strict=True)',
        "model.eval()",
        "with torch.no_grad():",
        f"    features = model.forward_features(torch.zeros(1, {pre['channels']}, {shape}))  # (1, feature_dim)",
        "```",
    ]
    if "task" in config:
        lines += [
            "",
            f"`{config['head']}` holds the head (`norm.*`: feature standardisation, `fc.*`: the linear layer); "
            "`config.json`'s `task` says how its outputs become probabilities or predictions.",
        ]
    if "embed_dim" in arch.get("kwargs", {}):
        lines += [
            "",
            "### MONAI",
            "",
            "Into MONAI's `ViT` (`monai.networks.nets.ViT`), without neurotransfer: `features(volume)` gives the "
            "backbone's features.",
            "",
            "```python",
            monai_load_snippet(where).rstrip(),
            "```",
        ]
    return lines


def _preprocessing(pre: Mapping[str, Any]) -> list[str]:
    crop = {True: "crop to the bounding box of the non-zero voxels", False: "none (volumes on a template grid)"}
    intensity = f"`{pre['intensity']}`"
    if pre.get("intensity_mask"):
        intensity += f", statistics over the {pre['intensity_mask']}"
    if pre.get("percentiles"):
        intensity += f" (percentiles {pre['percentiles'][0]:g}-{pre['percentiles'][1]:g} to [0, 1])"
    return [
        "## Preprocessing it expects",
        "",
        "| step | value |",
        "|---|---|",
        f"| orientation | {pre['orientation']}+ (reorient before anything else) |",
        f"| spacing | {_mm(pre['spacing'])} mm, {pre.get('interpolation', 'trilinear')} interpolation |",
        f"| foreground crop | {crop.get(pre.get('crop_foreground'), 'unrecorded')} |",
        f"| shape | {' × '.join(map(str, pre['shape']))} voxels (D × H × W), {pre.get('pad_crop', 'pad or crop')} |",
        f"| intensity | {intensity} (`common.data.PreprocessConfig.intensity`) |",
        f"| input | {pre['channels']} channel{'s' if pre['channels'] != 1 else ''}, {pre['layout']} |",
        "",
        "`common.data.load_volume(path, PreprocessConfig(spacing, shape, intensity, percentiles, crop_foreground))` "
        "does all of it.",
    ]


def _training_data(summary: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Training data", ""]
    if not summary:
        return lines + ["Not recorded by the run that wrote this export."]
    for source, facts in summary.items():
        told = ", ".join(f"{k.replace('_', ' ')} {_value(v)}" for k, v in facts.items())
        lines.append(f"- `{source}`: {told}")
    return lines


def _task(task: Mapping[str, Any]) -> list[str]:
    lines = ["## Task head", ""]
    if task.get("classes"):
        lines.append(f"Classes by output index: {', '.join(f'{i} `{c}`' for i, c in enumerate(task['classes']))}.")
        if task.get("threshold") is not None:
            lines.append(f"Decision threshold on the probability of `{task['classes'][1]}`: {task['threshold']:.4g}.")
    else:
        lines.append(f"Predicts `{task['column']}`.")
        bias = task.get("bias_correction")
        if bias:
            lines.append(
                f"Bias correction (fitted on the fold's validation subjects): corrected = (prediction - "
                f"{bias['intercept']:.4g}) / {bias['slope']:.4g}."
            )
    return lines


def _pretraining(config: Mapping[str, Any]) -> list[str]:
    objective = config.get("objective", "unrecorded")
    lines = ["## Training", ""]
    curve = config.get("training")
    if curve:
        lines.append(
            f"Training loss ({objective}) over {curve['logged_steps']} logged steps: "
            f"{curve['first']['loss']:.4g} at step {curve['first']['step']}, lowest {curve['lowest']['loss']:.4g} "
            f"at step {curve['lowest']['step']}, {curve['last']['loss']:.4g} at the last logged step "
            f"{curve['last']['step']} (mean of the last tenth {curve['last_tenth_mean']:.4g})."
        )
    else:
        lines.append("No metrics.jsonl was given with this export, so no loss curve is summarised here.")
    shown = ("corpus", "objective", "precision", "step", "steps", "images_seen", "manifest_hash", "package_version")
    provenance = {k: v for k, v in config.items() if k in shown and v is not None}
    lines += ["", "Provenance: " + ", ".join(f"{k} `{v}`" for k, v in provenance.items()) + "."]
    lines += ["", "`config.json` holds everything above in machine-readable form."]
    return lines


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{value[0]}-{value[1]}"
    return str(value)


def _mm(spacing: Any) -> str:
    values = [spacing] * 3 if isinstance(spacing, (int, float)) else list(spacing)
    return " × ".join(f"{v:g}" for v in values)
