"""Masked autoencoding and contrastive learning on one ViT encoder: MAE + NT-Xent.

Mishra et al., "A simple, efficient and scalable contrastive masked autoencoder for learning visual
representations" (CAN), 2022: two views of an image, each masked at random, go through the encoder once (visible
tokens only); the decoder reconstructs each view's masked patches, and the pooled visible tokens of the two views
are a positive pair of an InfoNCE over the batch. The two losses are complementary: reconstruction shapes what a
single volume's tokens hold, the contrastive term what tells volumes apart. CAN's third term (noise prediction) is
left out. MAE's stages (``mae.py``) and SimCLR's loss (``simclr.nt_xent``) are reused as they are.
"""

from __future__ import annotations

import torch

from common.models.vit import ViT3D
from pretrain.objectives.heads import mlp_head
from pretrain.objectives.mae import MaskedAutoencoder
from pretrain.objectives.simclr import nt_xent


class ContrastiveMaskedAutoencoder(MaskedAutoencoder):
    """MAE's encoder and decoder plus SimCLR's projection MLP on the encoder's pooled visible tokens.

    ``forward({"view1", "view2"})`` returns ``{"loss", "reconstruction", "contrastive", "pred", "mask"}``; ``loss``
    is ``reconstruction + contrastive_weight * contrastive``; ``pred`` and ``mask`` hold view 1's rows, then view
    2's. The exported encoder is MAE's (``self.encoder``).
    """

    needs_views = True

    def __init__(
        self,
        encoder: ViT3D,
        mask_ratio: float = 0.75,
        masking: str = "random",
        norm_pix_loss: bool = True,
        decoder_dim: int = 384,
        decoder_depth: int = 4,
        decoder_heads: int = 12,
        proj_hidden: int = 2048,
        proj_dim: int = 256,
        temperature: float = 0.2,
        contrastive_weight: float = 0.5,
    ):
        super().__init__(encoder, mask_ratio, masking, norm_pix_loss, decoder_dim, decoder_depth, decoder_heads)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if contrastive_weight < 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {contrastive_weight}")
        self.projector = mlp_head(encoder.feature_dim, proj_hidden, proj_dim, num_layers=2, last_bn=False)
        self.temperature = temperature
        self.contrastive_weight = contrastive_weight

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        B = batch["view1"].shape[0]
        imgs = torch.cat([batch["view1"], batch["view2"]], dim=0)  # (2B, 1, D, H, W): one encoder pass
        latent, mask, ids_restore = self.forward_encoder(imgs)  # (2B, P + n_keep, C): each view its own mask
        pred = self.forward_decoder(latent, ids_restore)  # (2B, N, p³C)
        reconstruction = self.forward_loss(imgs, pred, mask)
        z = self.projector(self.encoder.pool(latent))  # (2B, C) the encoder's pooling of visible tokens -> (2B, d)
        contrastive = nt_xent(z[:B], z[B:], self.temperature)
        return {
            "loss": reconstruction + self.contrastive_weight * contrastive,
            "reconstruction": reconstruction.detach(),
            "contrastive": contrastive.detach(),
            "pred": pred.detach(),
            "mask": mask,
        }

    @torch.no_grad()
    def images(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """MAE's slices for view 1 of the first volume (row 0 of ``out``)."""
        return super().images({"image": batch["view1"]}, out)
