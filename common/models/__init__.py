"""Backbones: one registry (``create_backbone``), the 3D ViT and MONAI CNN wrappers, 3D sin-cos embeddings.

Importing this package registers every backbone (the model modules register themselves on import).
"""

from common.models import cnn, vit  # noqa: F401  (registers the backbones)
from common.models.cnn import DenseNet3D, ResNet3D
from common.models.pos_embed import sincos_3d
from common.models.registry import create_backbone, list_backbones, register_backbone
from common.models.vit import ViT3D

__all__ = [
    "DenseNet3D",
    "ResNet3D",
    "ViT3D",
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "sincos_3d",
]
