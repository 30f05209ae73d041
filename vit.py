"""
EVA-ViT-g, the image encoder of BLIP-2 (Li et al. 2023), as LAVIS builds it in `eva_vit.py`.

A plain pre-norm ViT: patch embedding, CLS token, absolute position embedding, then blocks of
x + attn(norm1(x)), x + mlp(norm2(x)). Quirks kept from EVA: the fused qkv projection has a query
bias and a value bias but no key bias, the MLP is 1408 -> 6144 (mlp_ratio 4.3637), exact GELU,
LayerNorm eps 1e-6, and there is no final norm: the output is the raw tokens of the last block
(CLS included). BLIP-2 builds 39 blocks and loads them from a 40-block checkpoint ("use the
second-last layer"); convert.py drops block 39 explicitly.

Parameter names equal the LAVIS `eva_vit_g.pth` keys, so that file loads as an identity mapping.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    def __init__(self, width, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        # EVA has no key bias; it would be dead weight anyway: q.(k + b) shifts every score of a
        # query by the same q.b, and softmax ignores a constant shift.
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # scale head_dim^-0.5, no mask
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, width, mlp_dim):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU() in EVA


class Block(nn.Module):
    def __init__(self, width, n_head, mlp_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, n_head)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width, mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution -> [B, N, width] tokens in row-major order."""

    def __init__(self, patch_size, width):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def interpolate_pos_embed(pos_embed, grid):
    """Resize a [1, 1 + g*g, C] position embedding to a grid x grid patch grid, CLS slot kept.

    LAVIS's rule, applied once when loading weights for another image size: bicubic,
    align_corners=False, in fp32. The result stays fp32 (not rounded back to an fp16 checkpoint's
    dtype); loading casts it to the model's dtype.
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old = math.isqrt(patch_pos.shape[1])
    if old * old != patch_pos.shape[1]:
        raise ValueError(f"pos_embed has {patch_pos.shape[1]} patch positions, not a square grid")
    if old == grid:
        return pos_embed
    C = pos_embed.shape[-1]
    patch_pos = patch_pos.float().reshape(1, old, old, C).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, C)
    return torch.cat((cls_pos.float(), patch_pos), dim=1)


@dataclass
class ViTConfig:
    img_size: int = 224   # the position grid is img_size // patch_size square; loaders resize it
    patch_size: int = 14
    width: int = 1408
    depth: int = 39       # blocks built and used; eva_vit_g.pth holds 40, BLIP-2 uses 39
    n_head: int = 16      # head_dim 88
    mlp_dim: int = 6144   # int(1408 * 4.3637)

    @property
    def grid(self):
        return self.img_size // self.patch_size

    @staticmethod
    def preset(name, **overrides):
        if name not in VIT_PRESETS:
            raise ValueError(f"unknown ViT preset {name!r}; choose from {sorted(VIT_PRESETS)}")
        return ViTConfig(**{**VIT_PRESETS[name], **overrides})


VIT_PRESETS = {
    "eva_vit_g": dict(),
    "tiny": dict(img_size=56, patch_size=14, width=64, depth=2, n_head=4, mlp_dim=256),
}


class EVAViT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.img_size % config.patch_size:
            raise ValueError(f"img_size {config.img_size} is not a multiple of patch_size {config.patch_size}")
        self.config = config
        self.grad_checkpointing = False  # recompute each block in backward to save activation memory
        self.patch_embed = PatchEmbed(config.patch_size, config.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.grid ** 2, config.width))
        self.blocks = nn.ModuleList(Block(config.width, config.n_head, config.mlp_dim) for _ in range(config.depth))
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, pixels):
        """pixels [B, 3, H, W] (normalised) -> tokens [B, 1 + (H/patch)^2, width]."""
        size = self.config.img_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"EVAViT expects {size}x{size} images, got {tuple(pixels.shape[-2:])}; "
                             f"build it with img_size={pixels.shape[-1]} (loaders resize pos_embed)")
        x = self.patch_embed(pixels.to(self.pos_embed.dtype))
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x
