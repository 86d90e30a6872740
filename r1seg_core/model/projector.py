"""Multimodal projector (Fig. 2): encoder tokens -> visual tokens in the LLM's embedding space."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultimodalProjector(nn.Module):
    """3D average pooling of the token grid (2048 -> 256 tokens at paper size), then Linear, GELU, Linear."""

    def __init__(self, encoder_hidden: int, llm_hidden: int, grid: tuple[int, int, int], pool: int = 2):
        super().__init__()
        self.grid = tuple(grid)
        self.pool = pool
        self.pooled_grid = tuple(g // pool for g in grid)
        self.layers = nn.Sequential(nn.Linear(encoder_hidden, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))

    @property
    def num_visual_tokens(self) -> int:
        d, h, w = self.pooled_grid
        return d * h * w

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        b, _, c = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, c, *self.grid)
        # Averaged in fp32: torch has no bf16 avg_pool3d on the CPU, where a bf16 model can run.
        pooled = F.avg_pool3d(grid.float(), kernel_size=self.pool, stride=self.pool).to(grid.dtype)
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.layers(self.pool_tokens(tokens))
