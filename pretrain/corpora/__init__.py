"""Pre-training corpora: synthetic MRI, medical NIfTI, video, and their mixture, as resumable sharded streams."""

from __future__ import annotations

from common.errors import ConfigError, DataError
from pretrain.config import CORPORA
from pretrain.corpora.medical import MedicalSource
from pretrain.corpora.mixed import MixedSource
from pretrain.corpora.packed import PackedSource
from pretrain.corpora.stream import CorpusStream, StreamPosition, make_loader
from pretrain.corpora.synthmri import SynthMRISource
from pretrain.corpora.video import VideoSource


def build_source(cfg, corpus: str | None = None):
    """The ``Source`` for ``corpus`` (default ``cfg.corpus``) from the run config ``cfg``."""
    corpus = corpus or cfg.corpus
    d, seed = cfg.data, cfg.train.seed
    if len(d.input_size) != 3 or min(d.input_size) < 1:
        raise ConfigError(f"data.input_size must be three positive sizes (D, H, W), got {list(d.input_size)}")
    if corpus == "synthmri":
        return SynthMRISource(d.synthmri, d.input_size, d.spacing, seed)
    if corpus == "medical":
        return MedicalSource(d.medical, d.input_size, d.spacing, seed)
    if corpus == "video":
        v = d.video
        return VideoSource(v.paths, d.input_size, v.stride, v.reader, v.extensions, seed)
    if corpus == "packed":
        return PackedSource(d.packed, d.input_size, d.spacing, seed)
    if corpus == "mixed":
        weights = {name: float(getattr(d.mixed, name)) for name in ("synthmri", "medical", "video")}  # MixedConfig
        return MixedSource({k: build_source(cfg, k) for k, w in weights.items() if w > 0}, weights)
    raise ConfigError(f"corpus must be one of {CORPORA}, got {corpus!r}")


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


__all__ = ["CorpusStream", "StreamPosition", "build_source", "make_loader", "require_covariates"]
