"""Pre-training corpora: synthetic MRI, medical NIfTI, video, their mixture and packed shards, as resumable sharded
streams.

``CORPORA`` below is the one list of them: a corpus is added by writing its ``Source`` module and registering it
here, with its builder from the run config, the covariates its items can carry and the model card's words for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError, DataError
from pretrain.corpora.medical import MedicalSource
from pretrain.corpora.mixed import MixedSource, mixture_weights
from pretrain.corpora.packed import PackedSource
from pretrain.corpora.stream import CorpusStream, Source, StreamPosition, make_loader
from pretrain.corpora.synthmri import SynthMRISource
from pretrain.corpora.video import VideoSource
from pretrain.registry import Registry
from pretrain.views import rescan_views


@dataclass(frozen=True)
class RegisteredCorpus:
    build: Callable[[Any], Source]  # the run config -> the corpus's items
    covariates: tuple[str, ...] = ()  # per-item covariates its batches can carry (an objective's needs_covariates)
    rescans: bool = False  # it can give two renderings of one subject (Source.pair): objective.contrastive.views=rescan
    description: str | None = None  # how the exported model card words it; None: by its name


CORPORA: Registry[RegisteredCorpus] = Registry("corpus", RegisteredCorpus)


@CORPORA.register(
    "synthmri", covariates=("age",), rescans=True, description="synthetic brain MRI (synth/, generated on the fly)"
)
def _synthmri(cfg) -> SynthMRISource:
    d = cfg.data
    return SynthMRISource(d.synthmri, d.shape, d.spacing, cfg.train.seed, rescan=rescan_views(cfg))


# age only from a manifest with the column (a folder of NIfTI files has none; pretrain.config.check_covariates)
@CORPORA.register("medical", covariates=("age",), description="medical NIfTI volumes")
def _medical(cfg) -> MedicalSource:
    d = cfg.data
    return MedicalSource(d.medical, d.shape, d.spacing, cfg.train.seed)


@CORPORA.register("video", description="natural video")
def _video(cfg) -> VideoSource:
    d, v = cfg.data, cfg.data.video
    return VideoSource(v.paths, d.shape, v.stride, v.reader, v.extensions, cfg.train.seed)


@CORPORA.register("mixed", description="a mix of synthetic MRI, medical volumes and video")
def _mixed(cfg) -> MixedSource:
    weights = mixture_weights(cfg.data.mixed)
    return MixedSource({k: build_source(cfg, k) for k, w in weights.items() if w > 0}, weights)


@CORPORA.register("packed")
def _packed(cfg) -> PackedSource:
    d = cfg.data
    return PackedSource(d.packed, d.shape, d.spacing, cfg.train.seed)


def build_source(cfg, corpus: str | None = None):
    """The ``Source`` for ``corpus`` (default ``cfg.corpus``) from the run config ``cfg``."""
    corpus = corpus or cfg.corpus
    d = cfg.data
    if len(d.shape) != 3 or min(d.shape) < 1:
        raise ConfigError(f"data.shape must be three positive sizes (D, H, W), got {list(d.shape)}")
    return CORPORA[corpus].build(cfg)


def require_covariates(source, needs: tuple[str, ...]) -> None:
    """A ``DataError`` naming the manifest when ``source`` cannot give every covariate in ``needs`` (the config
    check has passed: the corpus kind has them, but this manifest lacks the column); then the items without a
    value are dropped, counted in the log (``MedicalSource.keep_items_with``), before any batch is read."""
    missing = [c for c in needs if c not in getattr(source, "covariates", ())]
    if missing:
        where = getattr(source, "manifest", None) or source.name
        raise DataError(where, f"no {', '.join(missing)} column: the objective needs it for every item")
    if needs and hasattr(source, "keep_items_with"):
        source.keep_items_with(needs)


__all__ = ["CORPORA", "CorpusStream", "StreamPosition", "build_source", "make_loader", "require_covariates"]
