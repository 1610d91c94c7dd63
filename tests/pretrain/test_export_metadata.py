"""The metadata exported with an encoder names the preprocessing each corpus really had, and what it saw."""

import shutil

import pandas as pd

from common.config import load_config
from common.data import PreprocessConfig
from common.data.packed import pack_manifest
from common.io import file_hash
from pretrain.config import PretrainConfig
from pretrain.provenance import SEEN_DIGITS, SEEN_HASH, export_metadata


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


# ----------------------------------------------------------------------- what the encoder saw (leakage check)
def _digests(paths) -> list[str]:
    return sorted(file_hash(p, SEEN_HASH)[:SEEN_DIGITS] for p in paths)


def test_a_medical_corpus_records_the_content_hash_of_every_image_it_lists(nifti_dir, tmp_path):
    good = [nifti_dir / n for n in ("s1.nii.gz", "s2.nii.gz", "site2/s3.nii.gz")]
    pd.DataFrame({"path": [str(p) for p in good]}).to_csv(tmp_path / "m.csv", index=False)
    meta = export_metadata(
        load_config(PretrainConfig, overrides=["corpus=medical", f"data.medical.manifest={tmp_path / 'm.csv'}"])
    )
    assert meta["seen"]["images"] == _digests(good) and meta["seen"]["generated"] == {}
    folder = export_metadata(
        load_config(PretrainConfig, overrides=["corpus=medical", f"data.medical.directory={nifti_dir}"])
    )
    assert folder["seen"]["images"] == _digests(sorted(nifti_dir.rglob("*.nii.gz")))  # every file of the folder


def test_a_pack_records_the_images_it_was_made_from(nifti_dir, tmp_path):
    good = [nifti_dir / n for n in ("s1.nii.gz", "s2.nii.gz", "site2/s3.nii.gz")]
    pd.DataFrame({"path": [str(p) for p in [good[0], nifti_dir / "broken.nii.gz", *good[1:]]]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    pack_manifest(tmp_path / "m.csv", tmp_path / "pack", PreprocessConfig(spacing=(4.0,) * 3, shape=(16,) * 3))
    cfg = load_config(PretrainConfig, overrides=["corpus=packed", f"data.packed.directory={tmp_path / 'pack'}"])
    assert export_metadata(cfg)["seen"]["images"] == _digests(good)  # the broken file was never packed


def test_a_synthmri_folder_records_its_images_and_generation_on_the_fly_its_seed_and_positions(nifti_dir, tmp_path):
    folder = tmp_path / "synth"
    folder.mkdir()
    names = ["s1.nii.gz", "s2.nii.gz"]
    for name in names:
        shutil.copy(nifti_dir / name, folder / name)
    pd.DataFrame({"path": names, "subject_id": ["a", "b"]}).to_csv(folder / "manifest.csv", index=False)
    meta = export_metadata(load_config(PretrainConfig, overrides=[f"data.synthmri.directory={folder}"]))
    assert meta["seen"]["images"] == _digests([folder / n for n in names])

    fly = ["train.seed=3", "train.steps=5", "data.batch_size=2", "optim.accumulation_steps=2"]
    generated = export_metadata(load_config(PretrainConfig, overrides=fly))["seen"]
    assert generated["images"] == []
    record = generated["generated"]["synthmri"]
    assert record["seed"] == 3 and record["positions"] == [0, 5 * 2 * 2]  # steps x accumulation x batch, one rank
    other = export_metadata(
        load_config(PretrainConfig, overrides=[*fly, "data.synthmri.overrides=[cohort.corpus_ad_fraction=0.3]"])
    )
    assert other["seen"]["generated"]["synthmri"]["config_sha256"] != record["config_sha256"]


def test_a_medical_manifest_is_summarised_for_the_card(tmp_path):
    manifest = tmp_path / "m.csv"
    rows = {"path": [f"{i}.nii.gz" for i in range(5)], "subject_id": ["a", "a", "b", "c", "d"]}
    pd.DataFrame({**rows, "site": ["x", "x", "y", "y", "y"], "age": [61.04, None, 70.0, 80.26, 55.0]}).to_csv(
        manifest, index=False
    )
    meta = export_metadata(
        load_config(PretrainConfig, overrides=["corpus=medical", f"data.medical.manifest={manifest}"])
    )
    assert meta["training_data"] == {"medical": {"images": 5, "subjects": 4, "sites": 2, "age_range": [55.0, 80.3]}}
    assert meta["crop_foreground"] is True and meta["license"] == "other"  # medical images: their own terms


def test_a_synthetic_corpus_records_its_generator_seed():
    meta = export_metadata(load_config(PretrainConfig, overrides=["corpus=synthmri", "train.seed=7"]))
    assert meta["training_data"]["synthmri"]["seed"] == 7 and meta["license"] == "apache-2.0"
    assert meta["crop_foreground"] is False  # generated on the template grid
