"""The image encoder: timm's VisionTransformer as BLIP uses it.

A class token is prepended, there is no pooling and no head: the forward pass returns every token
after the final LayerNorm, shape (B, 1+N, D). LayerNorm eps is 1e-6, qkv has a bias and GELU is
exact, so the parameter names (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.attn.qkv`,
`norm`, ...) and the math match BLIP's `visual_encoder`. Gradient checkpointing can be limited to
the last k blocks (BLIP's `vit_ckpt_layer`). `interpolate_pos_embed` resizes a position table to a
new grid when weights trained at another image size are loaded; the forward pass never does.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.config import VisionConfig


class BlipViT(VisionTransformer):
    """timm ViT that returns all tokens; checkpointing of the last `grad_ckpt_layers` blocks."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.width,
            depth=config.depth,
            num_heads=config.heads,
            mlp_ratio=config.mlp_ratio,
            qkv_bias=True,
            num_classes=0,
            global_pool="",
            drop_path_rate=config.drop_path,
            norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
        )
        self.ckpt_layers = config.grad_ckpt_layers
        self.set_grad_checkpointing(config.grad_checkpointing)
        if config.pos_embed_init == "sincos":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_pos_embed(config.width, config.grid, config.pos_embed_step,
                                                   config.pos_embed_gain).unsqueeze(0))

    def forward(self, image: Tensor) -> Tensor:
        """image (B, 3, H, W) -> tokens (B, 1+N, D) after the final norm."""
        x = self.patch_embed(image)  # (B, N, D)
        x = self._pos_embed(x)  # (B, 1+N, D), class token prepended
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        first_ckpt = len(self.blocks) - self.ckpt_layers if self.ckpt_layers > 0 else 0
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and i >= first_ckpt and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)


def build_vit(config: VisionConfig) -> BlipViT:
    """The image encoder of a preset (timm init: trunc-normal 0.02 linears and position table)."""
    return BlipViT(config)


def sincos_pos_embed(dim: int, grid: int, step: float = 1.0, gain: float = 1.0) -> Tensor:
    """Fixed 2-D sine-cosine table (1+grid², dim); the class-token row is zero.

    Patch (i, j) sits at coordinates (i·step, j·step); `gain` scales the whole table.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # (D/4,)
    coords = torch.arange(grid, dtype=torch.float64) * step
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (g, g) each
    parts = []
    for pos in (yy.reshape(-1), xx.reshape(-1)):
        angles = pos[:, None] * omega[None, :]  # (g², D/4)
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1) * gain  # (g², D)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


def interpolate_pos_embed(pos_embed: Tensor, new_grid: int) -> Tensor:
    """Resize a (1, 1+g², D) position table to (1, 1+new_grid², D): cls row kept, bicubic."""
    num_patches = pos_embed.shape[1] - 1
    old_grid = int(math.isqrt(num_patches))
    if old_grid * old_grid != num_patches:
        raise ValueError(f"position table has {num_patches} patch rows, not a square grid")
    if old_grid == new_grid:
        return pos_embed
    cls_row, patches = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    patches = patches.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([cls_row, patches], dim=1)
