"""3D ViT image encoder (Fig. 2, "Unified 3D encoder"): one set of tokens for both the LLM and the mask decoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError


def patch_grid(image_size: tuple[int, int, int], patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """Token grid (d, h, w) of a window; every image size must be a multiple of the patch size."""
    if any(s % p for s, p in zip(image_size, patch_size)):
        raise InvalidInputError(f"window size {tuple(image_size)} is not a multiple of the patch size {tuple(patch_size)}")
    return tuple(s // p for s, p in zip(image_size, patch_size))


class Attention(nn.Module):
    """Multi-head self-attention with a fused, bias-free qkv projection, computed with SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise InvalidInputError(f"encoder hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # The fused output is laid out (3, heads, head_dim): the checkpoints of the original model rely on it.
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoder3D(nn.Module):
    """Patchify a (B,1,D,H,W) window into (pd,ph,pw) cubes, project, add a learned absolute position, run the blocks.

    No CLS token: all tokens are spatial so they can be reshaped into the decoder's image embedding grid.
    """

    def __init__(self, image_size=(32, 256, 256), patch_size=(4, 16, 16), hidden_size=768, depth=12,
                 num_heads=12, mlp_dim=3072, in_channels=1):
        super().__init__()
        self.image_size = tuple(image_size)
        self.patch_size = tuple(patch_size)
        self.in_channels = in_channels
        self.grid = patch_grid(self.image_size, self.patch_size)
        self.hidden_size = hidden_size
        num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        patch_voxels = in_channels * self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        self.patch_projection = nn.Linear(patch_voxels, hidden_size)
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_tokens, hidden_size))
        self.blocks = nn.ModuleList(EncoderBlock(hidden_size, num_heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden_size)
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)

    def check_input(self, images: torch.Tensor) -> None:
        if images.dim() != 5:
            raise InvalidInputError(f"the encoder takes (B, C, D, H, W) windows; got a tensor of rank {images.dim()}")
        if images.shape[1] != self.in_channels:
            raise InvalidInputError(f"the encoder takes {self.in_channels} channel(s); got {images.shape[1]}")
        if tuple(images.shape[2:]) != self.image_size:
            raise InvalidInputError(f"the encoder takes windows of {self.image_size}; got {tuple(images.shape[2:])}")
        if not images.is_meta and not torch.isfinite(images).all():
            raise InvalidInputError("the image contains NaN or infinite values")

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B,C,D,H,W) -> (B, N, pd*ph*pw*C): tokens row-major over the grid, voxels row-major in a patch, channel last."""
        b, c = images.shape[:2]
        (gd, gh, gw), (pd, ph, pw) = self.grid, self.patch_size
        x = images.reshape(b, c, gd, pd, gh, ph, gw, pw)
        return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, gd * gh * gw, pd * ph * pw * c)

    def forward(self, images: torch.Tensor, return_block_outputs: bool = False):
        self.check_input(images)
        x = self.patch_projection(self.patchify(images)) + self.position_embeddings
        block_outputs = []
        for block in self.blocks:
            x = block(x)
            block_outputs.append(x)
        tokens = self.norm(x)
        return (tokens, block_outputs) if return_block_outputs else tokens

    def tokens_to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,N,C) -> (B,C,d,h,w), the image embedding the prompt encoder and decoder work on."""
        b, _, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, *self.grid)
