"""Prompt encoder (Fig. 2), SAM-style in 3D: the segment embedding is the sparse prompt, the previous mask the dense one."""
from __future__ import annotations

import math

import torch
from torch import nn


class ChannelLayerNorm3d(nn.Module):
    """LayerNorm over the channels of every voxel of a (B,C,D,H,W) map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None, None] + self.bias[:, None, None, None]


class RandomFourierPositionalEncoding(nn.Module):
    """sin/cos of voxel-centre coordinates projected by a fixed Gaussian matrix, as in SAM, in 3D."""

    def __init__(self, num_features: int):
        super().__init__()
        self.register_buffer("gaussian_matrix", torch.randn(3, num_features))

    def forward(self, grid: tuple[int, int, int]) -> torch.Tensor:
        d, h, w = grid
        device = self.gaussian_matrix.device
        zs = (torch.arange(d, device=device, dtype=torch.float32) + 0.5) / d
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        z, y, x = torch.meshgrid(zs, ys, xs, indexing="ij")
        # The published weights were trained with the first coordinate taken along dim 1, not dim 0.
        coords = torch.stack([y, z, x], dim=-1) * 2 - 1
        projected = 2 * math.pi * coords @ self.gaussian_matrix.to(coords.dtype)
        encoding = torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)
        return encoding.permute(3, 0, 1, 2).unsqueeze(0)


class PromptEncoder3D(nn.Module):
    def __init__(self, embed_dim: int, grid: tuple[int, int, int], mask_in_chans: int = 16):
        super().__init__()
        self.embed_dim = embed_dim
        self.grid = tuple(grid)
        self.positional_encoding = RandomFourierPositionalEncoding(embed_dim // 2)
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        # Two stride-2 convolutions bring the 4x-upsampled low-res logits back to the token grid.
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            ChannelLayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            ChannelLayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )

    def dense_positional_encoding(self) -> torch.Tensor:
        return self.positional_encoding(self.grid)

    def forward(self, prompt_embedding: torch.Tensor, previous_mask_logits: torch.Tensor | None = None):
        """prompt (B,C) and optional low-res logits (B,1,4d,4h,4w) -> sparse (B,1,C), dense (B,C,d,h,w)."""
        sparse = prompt_embedding.unsqueeze(1)
        if previous_mask_logits is None:
            b = prompt_embedding.shape[0]
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(b, -1, *self.grid)
        else:
            dense = self.mask_downscaling(previous_mask_logits)
        return sparse, dense
