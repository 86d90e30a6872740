"""Inference profiles: how a CT becomes windows and how window answers become one mask.

- `project` (the default for models trained here): the canonical LPS grid at the model's spacing, HU clipped to
  the model's window and scaled to [0, 1], Gaussian-weighted averaging of window probabilities (overlap 0.25), an
  absent window a soft vote of probability 0, answers scored against the training templates.
- `original` (chosen automatically for checkpoints converted from the published R1Seg-3D weights): the voxel array
  as stored, never reoriented or resampled; the intensities the released models saw (M3D-Seg: SegVol's
  foreground percentile clip, then min-max to [0, 1]); MONAI's CropForeground; constant-weight averaging of window
  logits with overlap 0.5, a window whose answer has no [SEG] adding logits of -1000 (a veto); answers generated
  per window from the question as written. Without sliding windows the crop is resized to one window, the
  `M3D_Seg_npy` view the authors evaluated on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..convert.original_config import ORIGINAL_SOURCE_URL
from ..errors import InvalidInputError

PROJECT, ORIGINAL = "project", "original"
# SegVol's data preparation (which made M3D-Seg) clips to these percentiles of the voxels above the CT's mean, then
# z-scores; M3D's step to M3D_Seg_npy then min-max scales. Min-max after an affine z-score is the min-max of the
# clipped values, so the z-score drops out.
ORIGINAL_CLIP_PERCENTILES = (0.05, 99.95)


@dataclass(frozen=True)
class InferenceProfile:
    name: str
    grid: str               # "canonical": LPS at the model's spacing; "stored": the voxel array as stored
    overlap: float          # default window overlap
    fusion: str             # "gaussian": weighted mean of probabilities; "constant": plain mean of logits
    answer_mode: str        # default per-window answers: "constrained" or "generate"
    max_new_tokens: int | None = None   # generated answers' length limit; None: the model's max_answer_tokens


PROFILES = {
    PROJECT: InferenceProfile(PROJECT, grid="canonical", overlap=0.25, fusion="gaussian", answer_mode="constrained"),
    # The original's generate call: max_new_tokens=100.
    ORIGINAL: InferenceProfile(ORIGINAL, grid="stored", overlap=0.5, fusion="constant", answer_mode="generate",
                               max_new_tokens=100),
}


def resolve_profile(name: str, card: dict) -> InferenceProfile:
    """`auto` is `original` for folders converted from the published weights, `project` otherwise."""
    if name == "auto":
        name = ORIGINAL if card.get("source") == ORIGINAL_SOURCE_URL else PROJECT
    if name not in PROFILES:
        raise InvalidInputError(f"unknown inference profile {name!r}; choose auto, {' or '.join(PROFILES)}")
    return PROFILES[name]


def original_intensities(array: np.ndarray) -> np.ndarray:
    """The released models' input intensities in [0, 1], as float32 on the stored voxel array."""
    values = np.asarray(array, dtype=np.float32)
    foreground = values[values > values.mean(dtype=np.float64)]
    low, high = np.percentile(foreground, ORIGINAL_CLIP_PERCENTILES)
    clipped = np.clip(values, low, high).astype(np.float32)
    lowest, highest = clipped.min(), clipped.max()
    if highest <= lowest:
        raise InvalidInputError("the CT has a single intensity after the original's percentile clip; nothing to segment")
    return (clipped - lowest) / (highest - lowest)


def foreground_box(scaled: np.ndarray) -> tuple[slice, slice, slice]:
    """MONAI CropForeground's box (its defaults: voxels > 0, no margin) of a (z, y, x) array."""
    inside = scaled > 0
    if not inside.any():
        raise InvalidInputError("the CT has no voxel above its lowest intensity; nothing to segment")
    box = []
    for axis in range(3):
        hits = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)
