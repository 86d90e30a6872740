"""Mask decoder (Fig. 2), SAM-style in 3D: low-resolution mask logits at 4x the token grid."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import TwoWayTransformer


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, depth: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder3D(nn.Module):
    """Prompt tokens + image embedding -> mask logits at (4d, 4h, 4w) and an IoU estimate.

    Besides SAM's hypernetwork masks, the prompt embedding itself is projected and dotted with the upscaled
    image features, and that similarity is added to the logits (the SegVol text term the method keeps).
    """

    def __init__(self, dim: int, grid: tuple[int, int, int], transformer: TwoWayTransformer,
                 num_multimask_outputs: int = 3, iou_head_hidden: int = 256, iou_head_depth: int = 3):
        super().__init__()
        self.grid = tuple(grid)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.transformer = transformer
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        upscaled_grid = tuple(2 * g for g in grid)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, kernel_size=2, stride=2),
            # Normalised over the whole upscaled block (channels and voxels): it ties weights to the window size.
            nn.LayerNorm([dim // 4, *upscaled_grid]),
            nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, iou_head_hidden, self.num_mask_tokens, iou_head_depth)
        self.prompt_similarity = nn.Linear(dim, dim // 8)

    @property
    def low_res_size(self) -> tuple[int, int, int]:
        return tuple(4 * g for g in self.grid)

    def forward(self, image_embedding, image_pe, sparse, dense, prompt_embedding, trace: dict | None = None):
        """Returns (low-res logits of mask 0 (B,1,4d,4h,4w), IoU estimate of mask 0 (B,1))."""
        b = sparse.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        src = image_embedding + dense
        hs, keys = self.transformer(src, image_pe, tokens)
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, -1, *self.grid))
        mask_tokens = hs[:, 1:1 + self.num_mask_tokens]
        hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        flat = upscaled.flatten(2)
        masks = hyper @ flat
        masks = masks + self.prompt_similarity(prompt_embedding).unsqueeze(1) @ flat
        masks = masks.reshape(b, self.num_mask_tokens, *upscaled.shape[2:])
        iou = self.iou_prediction_head(hs[:, 0])
        if trace is not None:
            trace.update(twt_queries=hs, twt_keys=keys, upscaled=upscaled)
        return masks[:, :1], iou[:, :1]
