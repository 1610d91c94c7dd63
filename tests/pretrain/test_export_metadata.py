"""The metadata exported with an encoder names the preprocessing each corpus really had."""

from common.config import load_config
from pretrain.cli import export_metadata
from pretrain.config import PretrainConfig


def test_a_medical_corpus_records_its_own_intensity_mode():
    meta = export_metadata(load_config(PretrainConfig, overrides=["corpus=medical", "data.medical.intensity=zscore"]))
    assert meta["intensity"] == "zscore" and set(meta["sources"]) == {"medical"}


def test_a_mixed_corpus_records_each_sources_preprocessing():
    cfg = load_config(PretrainConfig, overrides=["corpus=mixed", "data.mixed.video=0"])
    meta = export_metadata(cfg)
    assert meta["sources"]["medical"]["intensity"] == "zscore"
    assert meta["sources"]["synthmri"]["intensity"] == "percentile"
    assert "video" not in meta["sources"]  # weight 0: not drawn from
    assert meta["intensity"] == "mixed"  # not one mode: a fine-tune must not trust a single value
    same = export_metadata(load_config(PretrainConfig, overrides=["corpus=mixed", "data.medical.intensity=percentile"]))
    assert same["intensity"] == "percentile" and set(same["sources"]) == {"synthmri", "medical", "video"}


def test_video_is_described_as_what_the_reader_does():
    meta = export_metadata(load_config(PretrainConfig, overrides=["corpus=video"]))
    assert meta["intensity"] == "percentile" and meta["sources"]["video"]["preprocessing"] == "grey (luma) / 255"
