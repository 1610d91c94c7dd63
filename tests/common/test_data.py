import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from common.data import (
    ManifestDataset,
    PreprocessConfig,
    build_preprocess,
    load_volume,
    read_manifest,
    spacing_affine,
    write_nifti,
)
from common.errors import ConfigError, DataError

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # voxel axes point Left, Posterior, Superior
LPS[:2, 3] = (19, 23)  # so that a (20, 24, 20) array flipped on i and j covers the same world positions


def brain(shape=(20, 24, 20), centre=None, seed=0):
    """An ellipsoid of positive intensities (a skull-stripped 'brain') in zero background, with a gradient
    along every axis so flips are visible."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.asarray(centre if centre is not None else [(s - 1) / 2 for s in shape], np.float32)
    radii = np.asarray([s / 3 for s in shape], np.float32)
    inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1
    values = 50 + 2 * grid[0] + 3 * grid[1] + 5 * grid[2] + rng.normal(0, 5, shape)
    return np.where(inside, values, 0).astype(np.float32)


def raw(**kw):
    """No resampling of note, no crop, no intensity change: the pipeline's geometry alone."""
    return PreprocessConfig(
        **{"spacing": (1, 1, 1), "shape": (20, 24, 20), "intensity": "none", "crop_foreground": False, **kw}
    )


# ------------------------------------------------------------------------------------------------ nifti
def test_write_nifti_roundtrip(tmp_path):
    a = brain()
    path = write_nifti(torch.from_numpy(a)[None], tmp_path / "v.nii.gz", spacing=(1.5, 2.0, 1.0))
    img = nib.load(path)
    assert img.shape == a.shape and img.get_data_dtype() == np.float32
    assert np.allclose(img.header.get_zooms(), (1.5, 2.0, 1.0))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(np.asarray(img.dataobj), a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii.gz"]
    with pytest.raises(ValueError, match="disagrees"):
        write_nifti(a, tmp_path / "w.nii.gz", spacing=(2, 2, 2), affine=np.eye(4))
    with pytest.raises(ValueError, match="got \\(4, 4\\)"):
        write_nifti(np.zeros((4, 4)), tmp_path / "x.nii.gz")


# ------------------------------------------------------------------------------------------ preprocessing
def test_reorients_lps_to_ras(tmp_path):
    a = brain()
    write_nifti(a, tmp_path / "ras.nii.gz", spacing=None, affine=np.eye(4))
    write_nifti(a[::-1, ::-1, :].copy(), tmp_path / "lps.nii.gz", spacing=None, affine=LPS)
    ras = load_volume(tmp_path / "ras.nii.gz", raw())
    lps = load_volume(tmp_path / "lps.nii.gz", raw())
    np.testing.assert_array_equal(ras[0].numpy(), a)
    np.testing.assert_array_equal(lps.numpy(), ras.numpy())  # same anatomy, same RAS array


def test_output_is_float32_tensor_of_config_shape(tmp_path):
    write_nifti(brain(), tmp_path / "v.nii.gz", spacing=(1.2, 1.0, 1.3))
    for shape in [(16, 16, 16), (32, 28, 24)]:
        x = load_volume(tmp_path / "v.nii.gz", PreprocessConfig(spacing=(1.0, 1.0, 1.0), shape=shape))
        assert type(x) is torch.Tensor and x.dtype == torch.float32 and tuple(x.shape) == (1, *shape)


def test_resamples_to_target_spacing(tmp_path):
    a = np.zeros((12, 12, 12), np.float32)
    a[4:8, 3:9, 5:7] = 1.0  # 4 x 6 x 2 voxels at 2 mm = 8 x 12 x 4 mm
    write_nifti(a, tmp_path / "v.nii.gz", spacing=(2.0, 2.0, 2.0))
    x = load_volume(tmp_path / "v.nii.gz", raw(shape=(32, 32, 32)))[0] > 0.5  # at 1 mm
    extent = [int(np.ptp(np.nonzero(x.numpy())[i])) + 1 for i in range(3)]
    assert all(abs(e - t) <= 1 for e, t in zip(extent, (8, 12, 4))), extent


def test_crops_and_pads_around_the_brain(tmp_path):
    a = brain(shape=(32, 32, 32), centre=(8, 22, 12))  # brain far off the volume centre
    write_nifti(a, tmp_path / "v.nii.gz")
    x = load_volume(tmp_path / "v.nii.gz", PreprocessConfig(shape=(28, 28, 28), intensity="none"))[0].numpy()
    nz = np.nonzero(x)
    centre = [(idx.min() + idx.max()) / 2 for idx in nz]
    assert all(abs(c - 13.5) <= 1 for c in centre), centre
    assert np.isclose(x.sum(), a.sum(), rtol=1e-4)  # nothing of the brain cropped away


def test_zscore_inside_brain(tmp_path):
    write_nifti(brain(), tmp_path / "v.nii.gz")
    x = load_volume(tmp_path / "v.nii.gz", PreprocessConfig(shape=(24, 24, 24), intensity="zscore"))[0]
    inside = x != 0
    assert inside.float().mean() < 0.5  # background kept at 0
    assert abs(x[inside].mean().item()) < 1e-3 and abs(x[inside].std().item() - 1) < 1e-2


def test_percentile_scaling_ignores_hot_voxel_and_padding(tmp_path):
    a = brain()
    a[10, 12, 10] = 1e6  # one hot voxel
    write_nifti(a, tmp_path / "v.nii.gz")
    small = load_volume(tmp_path / "v.nii.gz", PreprocessConfig(shape=(20, 24, 20), intensity="percentile"))
    big = load_volume(tmp_path / "v.nii.gz", PreprocessConfig(shape=(32, 32, 32), intensity="percentile"))
    inside = small[small != 0]
    assert inside.min() >= 0 and inside.max() == 1.0 and inside.median() > 0.2
    torch.testing.assert_close(big[big != 0].sort().values, inside.sort().values)  # padding changes nothing


def test_four_d_single_volume_is_fine(tmp_path):
    a = brain()
    write_nifti(a, tmp_path / "three.nii.gz")
    nib.save(nib.Nifti1Image(a[..., None], spacing_affine((1, 1, 1), a.shape)), tmp_path / "four.nii.gz")
    cfg = PreprocessConfig(shape=(24, 24, 24))
    four, three = load_volume(tmp_path / "four.nii.gz", cfg), load_volume(tmp_path / "three.nii.gz", cfg)
    torch.testing.assert_close(four, three)


def _bad(tmp_path, name, array):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


@pytest.mark.parametrize(
    "name, make, problem",
    [
        ("multi.nii.gz", lambda a: np.stack([a, a, a], -1), "4D file with 3 volumes"),
        ("flat.nii.gz", lambda a: a[:, :, 0], "expected a 3D volume, got 2D"),
        ("nan.nii.gz", lambda a: np.where(a > 0, np.nan, 0).astype(np.float32), "NaN/Inf"),
        ("inf.nii.gz", lambda a: np.where(a > 100, np.inf, a).astype(np.float32), "NaN/Inf"),
        ("zeros.nii.gz", lambda a: np.zeros_like(a), "all zeros"),
    ],
)
def test_invalid_volumes_raise_data_error_naming_file(tmp_path, name, make, problem):
    path = _bad(tmp_path, name, make(brain()))
    with pytest.raises(DataError, match=problem) as err:
        load_volume(path, PreprocessConfig(shape=(24, 24, 24)))
    assert err.value.path == path and str(path) in str(err.value)


def test_unreadable_or_missing_file_raises_data_error(tmp_path):
    text = tmp_path / "notes.nii.gz"
    text.write_text("this is not a NIfTI file")
    with pytest.raises(DataError, match="cannot be read as NIfTI") as err:
        load_volume(text, PreprocessConfig())
    assert str(text) in str(err.value)
    with pytest.raises(DataError, match="no such image file"):
        load_volume(tmp_path / "absent.nii.gz", PreprocessConfig())


def test_pipeline_is_a_monai_compose_on_custom_keys(tmp_path):
    write_nifti(brain(), tmp_path / "t1.nii.gz")
    write_nifti(brain(seed=1) * 2, tmp_path / "t2.nii.gz")
    out = build_preprocess(PreprocessConfig(shape=(16, 16, 16)), keys=("t1", "t2"))(
        {"t1": str(tmp_path / "t1.nii.gz"), "t2": str(tmp_path / "t2.nii.gz"), "age": 70.0}
    )
    assert out["t1"].shape == out["t2"].shape == (1, 16, 16, 16) and out["age"] == 70.0


def test_config_validation():
    with pytest.raises(ConfigError, match="intensity"):
        PreprocessConfig(intensity="minmax")
    with pytest.raises(ConfigError, match="spacing"):
        PreprocessConfig(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ConfigError, match="shape"):
        PreprocessConfig(shape=(96, 96))
    with pytest.raises(ConfigError, match="percentiles"):
        PreprocessConfig(percentiles=(99.0, 1.0))
    cfg = PreprocessConfig(spacing=[2, 2, 2], shape=[8, 8, 8])  # lists from YAML become tuples
    assert cfg.spacing == (2.0, 2.0, 2.0) and cfg.shape == (8, 8, 8)
    assert cfg.describe()["input_size"] == [8, 8, 8]


# ------------------------------------------------------------------------------------------------ manifest
HEADER = "path,subject_id,session_id,site,dataset,age,sex,diagnosis,scanner\n"


@pytest.fixture
def images(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        write_nifti(brain(seed=i), tmp_path / "img" / f"s{i}.nii.gz")
    return tmp_path


def write_csv(folder, rows, header=HEADER):
    path = folder / "manifest.csv"
    path.write_text(header + "".join(r + "\n" for r in rows))
    return path


GOOD = [
    "img/s0.nii.gz,007,1,A,ADNI,71.5,F,CN,siemens",
    "img/s1.nii.gz,008,1,A,ADNI,80,M,AD,ge",
    "img/s2.nii.gz,008,2,B,ADNI,81,M,AD,ge",
]


def test_read_manifest_resolves_paths_and_types(images):
    csv = write_csv(images, GOOD)
    df = read_manifest(csv, required=("path", "subject_id", "age"), diagnoses=("CN", "AD"))
    assert df["path"].tolist() == [str((images / "img" / f"s{i}.nii.gz").resolve()) for i in range(3)]
    assert df["subject_id"].tolist() == ["007", "008", "008"]  # identifiers stay text
    assert df["session_id"].tolist() == ["1", "1", "2"]
    assert df["age"].dtype == np.float64 and df["age"].tolist() == [71.5, 80.0, 81.0]
    assert df["scanner"].tolist() == ["siemens", "ge", "ge"]  # unknown column passes through


@pytest.mark.parametrize(
    "rows, kwargs, message",
    [
        (GOOD, {"required": ("path", "subject_id", "grade")}, "missing column\\(s\\) grade"),
        ([GOOD[0], "img/s1.nii.gz,,1,A,ADNI,80,M,AD,ge"], {}, "column 'subject_id' is empty on line 3 "),
        ([GOOD[0], "img/s1.nii.gz,008,1,A,ADNI,,M,AD,ge"], {"required": ["age"]}, "'age' is empty on line 3 \\(1 row"),
        ([GOOD[0], GOOD[0].replace("007", "009")], {}, "the same path .*s0.nii.gz on lines 2, 3"),
        ([GOOD[1], GOOD[2].replace(",008,2,", ",008,1,")], {}, "subject 008 session 1 on lines 2, 3"),
        ([GOOD[0], GOOD[1].replace(",80,", ",eighty,")], {}, "'age' must be numeric: 'eighty' on line 3"),
        (GOOD, {"diagnoses": ("CN", "MCI")}, "unknown diagnosis value\\(s\\) \\['AD'\\] on lines 3, 4"),
        ([GOOD[0], "img/absent.nii.gz,009,1,A,ADNI,70,F,CN,ge"], {}, "not found on line 3.*absent.nii.gz"),
        ([], {}, "no rows"),
    ],
)
def test_read_manifest_errors(images, rows, kwargs, message):
    csv = write_csv(images, rows)
    with pytest.raises(DataError, match=message) as err:
        read_manifest(csv, **kwargs)
    assert err.value.path == csv


def test_read_manifest_missing_file_and_unchecked_paths(images):
    with pytest.raises(DataError, match="manifest file does not exist") as err:
        read_manifest(images / "absent.csv")
    assert err.value.path == images / "absent.csv"
    csv = write_csv(images, ["elsewhere/x.nii.gz,1", "/abs/y.nii.gz,2"], header="path,subject_id\n")
    df = read_manifest(csv, check_files=False)
    assert df["path"].tolist() == [str((images / "elsewhere" / "x.nii.gz").resolve()), "/abs/y.nii.gz"]


# ------------------------------------------------------------------------------------------------ dataset
def test_manifest_dataset_items_and_batches(images):
    df = read_manifest(write_csv(images, GOOD))
    df["label"] = df["diagnosis"].map({"CN": 0, "AD": 1})
    cfg = PreprocessConfig(shape=(16, 16, 16))
    flip = lambda d: {**d, "image": d["image"].flip(1)}
    ds = ManifestDataset(df, cfg, label_column="label", transform=flip)
    item = ds[1]
    assert item["image"].shape == (1, 16, 16, 16) and item["subject_id"] == "008"
    assert item["label"].dtype == torch.long and item["label"].item() == 1
    torch.testing.assert_close(item["image"], load_volume(df["path"][1], cfg).flip(1))

    batch = next(iter(DataLoader(ManifestDataset(df, cfg, label_column="age"), batch_size=3)))
    assert batch["image"].shape == (3, 1, 16, 16, 16) and batch["label"].dtype == torch.float32
    assert batch["subject_id"] == ["007", "008", "008"]
    assert "label" not in ManifestDataset(df, cfg)[0]


def test_manifest_dataset_errors(images):
    df = read_manifest(write_csv(images, GOOD))
    with pytest.raises(DataError, match="map class names to integers"):
        ManifestDataset(df, PreprocessConfig(), label_column="diagnosis")
    with pytest.raises(DataError, match="'grade' is not in the manifest"):
        ManifestDataset(df, PreprocessConfig(), label_column="grade")
    df.loc[1, "age"] = np.nan
    with pytest.raises(DataError, match="has no 'age' label"):
        ManifestDataset(df, PreprocessConfig(), label_column="age")

    (images / "img" / "s2.nii.gz").write_text("corrupted")
    ds = ManifestDataset(df, PreprocessConfig(shape=(16, 16, 16)))
    with pytest.raises(DataError, match="s2.nii.gz: cannot be read as NIfTI"):
        ds[2]
