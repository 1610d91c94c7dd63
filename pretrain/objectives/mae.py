"""Masked autoencoding for 3D ViTs.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022: mask most patch tokens at random,
run the encoder on the visible ones only, reconstruct the masked patches' (normalised) voxels with a light
decoder. Tong et al., "VideoMAE", NeurIPS 2022: for video, "tube" masking repeats one spatial mask over time
(here: along D, which holds the frames) so a masked patch cannot be copied from its neighbour in time. Stages
follow facebookresearch/mae ``models_mae.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from common.errors import ConfigError
from common.models.pos_embed import sincos_3d
from common.models.vit import Block, LayerNorm, ViT3D, run_blocks
from pretrain.objectives.base import Objective

MASKINGS = ("random", "tube")  # per token, or one spatial mask repeated along D (VideoMAE's tube)


class MaskedAutoencoder(Objective):
    """A ``ViT3D`` encoder plus a light transformer decoder that predicts the voxels of masked patches.

    ``forward(batch)`` takes ``{"image": (B, 1, D, H, W)}`` and returns ``{"loss", "pred", "mask"}``.
    """

    image_tag = "mae"  # input, masked input and reconstruction slices

    def __init__(
        self,
        encoder: ViT3D,
        mask_ratio: float = 0.75,
        masking: str = "random",
        norm_pix_loss: bool = True,
        decoder_dim: int = 384,
        decoder_depth: int = 4,
        decoder_heads: int = 12,
    ):
        super().__init__()
        if not hasattr(encoder, "forward_tokens"):
            raise ConfigError(
                f"MAE needs a ViT backbone (token path); {type(encoder).__name__} has none — use a "
                "contrastive objective (simclr, moco) for CNNs"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        if masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
        if decoder_dim % decoder_heads:
            raise ValueError(f"decoder_dim {decoder_dim} is not divisible by decoder_heads {decoder_heads}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.masking = masking
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = encoder.patch_size  # (pd, ph, pw)
        self.grid_size = encoder.grid_size  # (gd, gh, gw)
        self.in_chans = encoder.in_chans
        P = encoder.num_prefix_tokens

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos = sincos_3d(decoder_dim, self.grid_size, cls_token=P > 0)  # (P + N, Cd), fixed
        self.decoder_pos_embed = nn.Parameter(pos.unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, backend=encoder.attn_backend) for _ in range(decoder_depth)
        )
        self.decoder_norm = LayerNorm(decoder_dim)
        patch_voxels = self.patch_size[0] * self.patch_size[1] * self.patch_size[2] * self.in_chans
        self.decoder_pred = nn.Linear(decoder_dim, patch_voxels)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token", "decoder_pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder's and the decoder's blocks in the backward. The switch is the encoder's
        (``model.grad_checkpointing`` is set there, before the objective is built), so it is one switch."""
        self.encoder.set_grad_checkpointing(enable)

    @property
    def num_keep(self) -> int:
        """Visible tokens per volume: int((1 - ratio) * N), per D-slab of tokens for tube masking."""
        gd, gh, gw = self.grid_size
        if self.masking == "tube":
            return gd * max(1, int(gh * gw * (1 - self.mask_ratio)))
        return max(1, int(gd * gh * gw * (1 - self.mask_ratio)))

    # ---- stages ------------------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, N, pd*ph*pw*C), tokens in the encoder's raster order."""
        B, C = imgs.shape[:2]
        (gd, gh, gw), (pd, ph, pw) = self.grid_size, self.patch_size
        x = imgs.reshape(B, C, gd, pd, gh, ph, gw, pw)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, gd, gh, gw, pd, ph, pw, C)
        return x.reshape(B, gd * gh * gw, pd * ph * pw * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, pd*ph*pw*C) -> (B, C, D, H, W)."""
        B = x.shape[0]
        (gd, gh, gw), (pd, ph, pw) = self.grid_size, self.patch_size
        x = x.reshape(B, gd, gh, gw, pd, ph, pw, self.in_chans)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, gd, pd, gh, ph, gw, pw)
        return x.reshape(B, self.in_chans, gd * pd, gh * ph, gw * pw)

    def random_masking(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-volume random (or tube) masks by argsort of uniform noise.

        Returns ``ids_keep`` (B, n_keep) long, ``mask`` (B, N) with 1 = masked, and ``ids_restore`` (B, N)
        that puts the [visible, masked] token sequence back into raster order.
        """
        gd, gh, gw = self.grid_size
        N = gd * gh * gw
        if self.masking == "tube":
            n_keep_slab = self.num_keep // gd
            noise = torch.rand(batch, gh * gw, device=device)  # one spatial mask per volume ...
            keep_slab = torch.argsort(noise, dim=1)[:, :n_keep_slab]  # (B, n_keep_slab)
            offsets = torch.arange(gd, device=device) * (gh * gw)  # ... repeated at every D position
            ids_keep = (offsets[None, :, None] + keep_slab[:, None, :]).reshape(batch, -1)  # (B, n_keep)
            mask = torch.ones(batch, N, device=device)
            mask.scatter_(1, ids_keep, 0.0)
            ids_shuffle = torch.argsort(mask, dim=1, stable=True)  # visible first (in raster order), then masked
        else:
            noise = torch.rand(batch, N, device=device)  # (B, N)
            ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
            mask = torch.ones(batch, N, device=device)
            mask[:, : self.num_keep] = 0
            mask = torch.gather(mask, 1, torch.argsort(ids_shuffle, dim=1))  # (B, N) in raster order
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N)
        ids_keep = ids_shuffle[:, : self.num_keep]  # (B, n_keep)
        return ids_keep, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, D, H, W) -> latent (B, P + n_keep, C_enc), mask (B, N), ids_restore (B, N)."""
        ids_keep, mask, ids_restore = self.random_masking(imgs.shape[0], imgs.device)
        latent = self.encoder.forward_tokens(imgs, ids_keep)  # visible tokens only
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, P + n_keep, C_enc) -> (B, N, pd*ph*pw*C) predicted voxels of every patch."""
        P = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, P + n_keep, Cd)
        B, _, Cd = x.shape
        N = ids_restore.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(B, N - (x.shape[1] - P), Cd)
        x_ = torch.cat([x[:, P:], mask_tokens], dim=1)  # (B, N, Cd) visible then masked
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Cd))  # (B, N, Cd) raster order
        x = torch.cat([x[:, :P], x_], dim=1) + self.decoder_pos_embed  # (B, P + N, Cd)
        x = run_blocks(self.decoder_blocks, x, self.encoder.grad_checkpointing)
        x = self.decoder_pred(self.decoder_norm(x))  # (B, P + N, pd*ph*pw*C)
        return x[:, P:]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, N, p³C) regression target: voxels, normalised per patch if norm_pix_loss."""
        target = self.patchify(imgs.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the voxels of masked patches only. pred (B, N, p³C), mask (B, N)."""
        loss = (pred.float() - self.target(imgs)) ** 2
        loss = loss.mean(dim=-1)  # (B, N) per patch
        return (loss * mask).sum() / mask.sum()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        imgs = batch["image"]  # (B, 1, D, H, W)
        latent, mask, ids_restore = self.forward_encoder(imgs)
        pred = self.forward_decoder(latent, ids_restore)  # (B, N, p³C)
        loss = self.forward_loss(imgs, pred, mask)
        return {"loss": loss, "pred": pred.detach(), "mask": mask}

    # ---- TensorBoard -------------------------------------------------------------------------------------
    @torch.no_grad()
    def images(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Middle D slices (1, H, W) in [0, 1] of the first volume: input, masked input, reconstruction."""
        imgs = batch["image"][:1].float()
        mask = out["mask"][:1]  # (1, N)
        pred = out["pred"][:1].float()  # (1, N, p³C)
        if self.norm_pix_loss:  # undo the per-patch normalisation with the input patch statistics
            patches = self.patchify(imgs)
            mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        voxel_mask = self.unpatchify(mask[..., None].expand_as(pred))  # (1, C, D, H, W) 1 = masked
        shown = {
            "input": imgs,
            "masked": imgs * (1 - voxel_mask),
            "reconstruction": self.unpatchify(pred) * voxel_mask + imgs * (1 - voxel_mask),
        }
        lo, hi = imgs.min(), imgs.max()
        mid = imgs.shape[2] // 2
        return {k: ((v[0, :1, mid] - lo) / (hi - lo + 1e-8)).clamp(0, 1) for k, v in shown.items()}
