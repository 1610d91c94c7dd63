"""Manifest CSVs, NIfTI loading and validation, the MONAI preprocessing pipeline and a manifest Dataset."""

from common.data.dataset import ManifestDataset
from common.data.manifest import MANIFEST_COLUMNS, read_manifest
from common.data.nifti import spacing_affine, write_nifti
from common.data.volume import PreprocessConfig, build_preprocess, check_volume, load_volume

__all__ = [
    "MANIFEST_COLUMNS",
    "ManifestDataset",
    "PreprocessConfig",
    "build_preprocess",
    "check_volume",
    "load_volume",
    "read_manifest",
    "spacing_affine",
    "write_nifti",
]
