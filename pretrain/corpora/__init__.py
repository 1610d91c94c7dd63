"""Pre-training corpora: synthetic MRI, medical NIfTI, video, and their mixture, as resumable sharded
streams."""

from __future__ import annotations

from common.errors import ConfigError
from pretrain.corpora.stream import CorpusStream, StreamPosition, make_loader

CORPORA = ("synthmri", "medical", "video", "mixed", "packed")


def build_source(cfg, corpus: str | None = None):
    """The ``Source`` for ``corpus`` (default ``cfg.corpus``) from the run config ``cfg``."""
    corpus = corpus or cfg.corpus
    d, seed = cfg.data, cfg.train.seed
    if len(d.input_size) != 3 or min(d.input_size) < 1:
        raise ConfigError(f"data.input_size must be three positive sizes (D, H, W), got {list(d.input_size)}")
    if corpus == "synthmri":
        from pretrain.corpora.synthmri import SynthMRISource

        return SynthMRISource(d.synthmri, d.input_size, d.spacing, seed)
    if corpus == "medical":
        from pretrain.corpora.medical import MedicalSource

        return MedicalSource(d.medical, d.input_size, d.spacing, seed)
    if corpus == "video":
        from pretrain.corpora.video import VideoSource

        v = d.video
        return VideoSource(v.paths, d.input_size, v.stride, v.reader, v.extensions, seed)
    if corpus == "packed":
        from pretrain.corpora.packed import PackedSource

        return PackedSource(d.packed, d.input_size, d.spacing, seed)
    if corpus == "mixed":
        from pretrain.corpora.mixed import MixedSource

        weights = {name: float(getattr(d.mixed, name)) for name in ("synthmri", "medical", "video")}
        return MixedSource({k: build_source(cfg, k) for k, w in weights.items() if w > 0}, weights)
    raise ConfigError(f"corpus must be one of {CORPORA}, got {corpus!r}")


__all__ = ["CORPORA", "CorpusStream", "StreamPosition", "build_source", "make_loader"]
