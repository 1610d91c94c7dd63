"""What a pre-training run's export records about its data: the input grid and preprocessing, each corpus it
drew from with its weight and real preprocessing, what that data was (images, subjects, sites, ages, or the
generator's seed) and the hash of the manifest (``common.checkpoint`` adds ``arch`` and the package version; the
trainer adds the step and the images seen). A fine-tune checks its own preprocessing against it
(``finetune.parity``) and refuses a test image the encoder has seen (``seen``:
``finetune.protocol.check_pretrain_overlap``); the model card summarises it (``common.export``).

``seen`` is compact: a file corpus (medical manifest rows or folder files, the images a pack was made from, a
synthmri folder) as the sorted content hashes of its images, the first ``SEEN_DIGITS`` hex digits of each file's
SHA-1 (the hash ``finetune.protocol`` gives every manifest image); synthmri generated on the fly as the generator's
config hash, seed and stream positions (subject ``p`` is ``synth.subject.corpus_plan(config, seed, p)``). Each
image is read once, at the run's start, by rank 0 (it alone writes the export), on a few threads (``hashlib``
releases the GIL): one extra read of the corpus, about its size over the disk's read rate (1 GB/s: 10,000 images of
5 MB in under a minute).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from common.data import PreprocessConfig, read_manifest
from common.data.packed import PackedVolumes
from common.distributed import get_world_size, is_rank_zero
from common.export import data_summary
from common.io import file_hash
from pretrain.corpora.medical import find_nifti
from pretrain.corpora.mixed import mixture_weights
from pretrain.corpora.synthmri import synth_config
from pretrain.corpora.weak_labels import WeakLabels
from pretrain.objectives import OBJECTIVES
from synth.dataset import GeneratedDirectory

# What each corpus feeds the model, as the nearest of common's intensity modes and in words: synthmri and video
# are not normalised by common.data but arrive in [0, 1], as common's "percentile" mode gives.
SOURCE_SCALING = {"synthmri": ("percentile", "generated on [0, 1]"), "video": ("percentile", "grey (luma) / 255")}
SYNTH_MANIFEST = "manifest.csv"  # what `python -m synth` writes beside its images
OPEN_DATA = ("synthmri", "video")  # corpora whose images carry no one's data terms: the weights are the code's
CODE_LICENSE = "apache-2.0"  # the package's (pyproject.toml); weights trained on medical images: "other"
SEEN_HASH = "sha1"  # finetune.protocol hashes every manifest image with it (duplicates, leakage)
SEEN_DIGITS = 16  # hex digits kept per image: 64 bits, a chance collision among a million images ~ 3e-8


def export_metadata(cfg) -> dict:
    """Provenance recorded with the exported encoder (``arch`` and the package version are added on export).
    ``sources`` holds each corpus the run drew from with its weight and real preprocessing; ``intensity`` and
    ``crop_foreground`` are their shared setting, or ``"mixed"`` / None when a mixed corpus combines different
    ones; ``training_data`` says what each source's data was, and with which labels (weak labels) where the
    objective learnt from covariates."""
    d = cfg.data
    needs = OBJECTIVES[cfg.objective.name].cls.needs_covariates
    weights = mixture_weights(d.mixed) if cfg.corpus == "mixed" else {cfg.corpus: 1.0}
    sources, data, hashed = {}, {}, None
    for name, weight in weights.items():
        if weight <= 0:
            continue
        crop, percentiles = False, None  # generated volumes and video frames: on their own grid, scaled to [0, 1]
        if name == "medical":
            pre = PreprocessConfig(spacing=tuple(d.spacing), shape=tuple(d.shape), intensity=d.medical.intensity)
            mode, how = pre.intensity, f"common.data {pre.intensity} at {list(d.spacing)} mm"
            crop, percentiles = pre.crop_foreground, list(pre.percentiles)
            hashed = file_hash(d.medical.manifest) if d.medical.manifest else None
            data[name] = _medical_summary(d.medical)
        elif name == "packed":  # the pack records its preprocessing and its source manifest
            pack = PackedVolumes(d.packed.directory).settings
            pre = pack["preprocess"]
            mode, how = pre["intensity"], f"packed shards of {Path(d.packed.directory).name}"
            crop, percentiles = pre.get("crop_foreground"), pre.get("percentiles")
            hashed = pack["source_hash"]
            data[name] = {"images": pack["count"]}
        else:
            mode, how = SOURCE_SCALING[name]
            data[name] = _synthmri_summary(cfg) if name == "synthmri" else {"video_paths": len(d.video.paths)}
        if needs:
            data[name]["labels"] = WeakLabels.from_config(cfg).describe(needs)
        sources[name] = {"weight": weight, "intensity": mode, "crop_foreground": crop, "preprocessing": how}
        if mode == "percentile" and percentiles is not None:
            sources[name]["percentiles"] = percentiles
    modes = {s["intensity"] for s in sources.values()}
    crops = {s["crop_foreground"] for s in sources.values()}
    percentiles = {tuple(s["percentiles"]) for s in sources.values() if "percentiles" in s}
    return {
        "input_size": list(d.shape),
        "spacing": list(d.spacing),
        "intensity": modes.pop() if len(modes) == 1 else "mixed",
        "crop_foreground": crops.pop() if len(crops) == 1 else None,
        **({"percentiles": list(percentiles.pop())} if len(percentiles) == 1 else {}),
        "sources": sources,
        "training_data": data,
        "license": CODE_LICENSE if set(sources) <= set(OPEN_DATA) else "other",
        "corpus": cfg.corpus,
        "objective": cfg.objective.name,
        "steps": cfg.train.steps,
        "manifest_hash": hashed,
        **({"seen": seen(cfg, list(sources))} if is_rank_zero() else {}),  # other ranks never export
    }


def seen(cfg, corpora: Iterable[str]) -> dict:
    """What the encoder was shown, for fine-tuning's leakage check: ``images``, the sorted content hashes of
    every file corpus's images; ``generated``, each corpus generated on the fly by its generator's config hash,
    seed and positions; ``unhashed``, the images a pack was made from that are no longer on disk (not checked)."""
    d = cfg.data
    files: list[Path] = []
    generated, unhashed = {}, 0
    for name in corpora:
        if name == "medical" and d.medical.manifest:
            files += [Path(p) for p in read_manifest(d.medical.manifest, required=("path",), check_files=False)["path"]]
        elif name == "medical" and d.medical.directory:
            files += find_nifti(d.medical.directory)
        elif name == "packed":  # the pack's rows name the images it was made from
            table = PackedVolumes(d.packed.directory).table
            sources = [Path(p) for p in table["path"]] if "path" in table else []
            unhashed += sum(not p.is_file() for p in sources)
            files += sources
        elif name == "synthmri" and d.synthmri.directory is not None:
            files += [Path(p) for p in GeneratedDirectory(d.synthmri.directory).table["path"]]
        elif name == "synthmri":
            config = json.dumps(asdict(synth_config(d.synthmri, d.spacing)), sort_keys=True, default=str)
            # a step draws accumulation x batch x world positions; a step skipped for a non-finite loss draws one
            # more batch (the checkpoints' stream position has the exact count)
            end = cfg.train.steps * cfg.optim.accumulation_steps * d.batch_size * get_world_size()
            generated[name] = {
                "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
                "seed": cfg.train.seed,
                "positions": [0, end],
            }
    present = sorted({p for p in files if p.is_file()})  # a listed file that is missing was never read either
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        images = sorted(set(pool.map(lambda p: file_hash(p, SEEN_HASH)[:SEEN_DIGITS], present)))
    return {"hash": SEEN_HASH, "digits": SEEN_DIGITS, "images": images, "generated": generated, "unhashed": unhashed}


def manifest_summary(manifest: str | Path) -> dict:
    """Images, subjects, sites and age range of a manifest's rows (``common.export.data_summary``)."""
    return data_summary(read_manifest(manifest, required=("path",), check_files=False))


def _medical_summary(medical) -> dict:
    """A manifest's summary, or the count of a folder's NIfTI files ({} when neither is set: nothing to count)."""
    if medical.manifest:
        return manifest_summary(medical.manifest)
    return {"images": len(find_nifti(medical.directory))} if medical.directory else {}


def _synthmri_summary(cfg) -> dict:
    """A generated folder: its manifest's summary; on the fly: the generator's seed (a new subject per image)."""
    directory = cfg.data.synthmri.directory
    if directory is not None:
        return {**manifest_summary(Path(directory) / SYNTH_MANIFEST), "generated_by": "synth"}
    return {"generated_by": "synth, on the fly (one new subject per image seen)", "seed": cfg.train.seed}
