"""Window-sized crops of a prepared case, and which structures each crop holds.

A crop is centred on a voxel of a randomly chosen structure with probability `foreground_ratio` (2:1 in the
reference) and anywhere otherwise; near the border it slides inwards, and a volume smaller than the window is
padded with 0, the value of air after the HU window (as inference pads).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from r1seg_core.preprocess import resize_to_window

from ..recipe import CropSettings
from .prepared import PreparedCase


@dataclass
class Crop:
    image: np.ndarray                 # float32 (D, H, W) window
    layers: np.ndarray                # (L, D, H, W) structure indices
    present: list[str]                # structures with enough voxels to be asked for
    absent: list[str]                 # annotated structures with no voxel in the crop: safe negatives
    index_of: dict[str, int]          # structure name -> its value in `layers`

    def mask(self, name: str) -> np.ndarray:
        if name not in self.index_of and name in self.absent:
            # Annotated by the dataset but absent from the whole case, so it has no index in `layers`.
            return np.zeros(self.image.shape, dtype=bool)
        return (self.layers == self.index_of[name]).any(0)


def crop_start(shape, window, centre) -> tuple[int, ...]:
    """The window start that puts `centre` in the middle, slid inside the volume along each axis."""
    return tuple(int(min(max(c - w // 2, 0), max(s - w, 0))) for s, w, c in zip(shape, window, centre))


def _padded(array: np.ndarray, window) -> np.ndarray:
    """`array` (.., d, h, w) zero-padded at the end of each short spatial axis to the window."""
    missing = [max(w - s, 0) for s, w in zip(array.shape[-3:], window)]
    if not any(missing):
        return array
    return np.pad(array, [(0, 0)] * (array.ndim - 3) + [(0, m) for m in missing])


def sample_crop(case: PreparedCase, window, settings: CropSettings, rng: np.random.Generator) -> Crop:
    targets = [s for s in case.structures if settings.targets is None or s.name in settings.targets]
    if rng.random() < settings.whole_volume_ratio:
        image, layers = _whole_volume(case, window)
    else:
        if targets and rng.random() < settings.foreground_ratio:
            structure = targets[rng.integers(len(targets))]
            voxels = case.foreground_voxels(structure.index)
            centre = voxels[rng.integers(len(voxels))]
        else:
            centre = [rng.integers(s) for s in case.shape]
        start = crop_start(case.shape, window, centre)
        region = tuple(slice(b, b + w) for b, w in zip(start, window))
        image = _padded(np.asarray(case.image()[region], dtype=np.float32), window)
        layers = _padded(np.asarray(case.labels()[(slice(None), *region)]), window)
    values = max((s.index for s in case.structures), default=0) + 1
    counts = sum(np.bincount(layer.ravel(), minlength=values) for layer in layers)
    present, absent = [], list(case.absent)
    for structure in case.structures:
        count = int(counts[structure.index])
        if count == 0:
            absent.append(structure.name)
        elif structure in targets and count >= min(settings.present_min_voxels, (structure.voxels + 1) // 2):
            present.append(structure.name)
        # In between, a sliver of the structure is in view: neither a fair positive nor a true negative.
    return Crop(image, layers, present, absent, {s.name: s.index for s in case.structures})


def _whole_volume(case: PreparedCase, window) -> tuple[np.ndarray, np.ndarray]:
    """The whole case squeezed into one window: the image as the predictor resizes it, each label layer by nearest
    neighbour."""
    import torch

    image = resize_to_window(np.asarray(case.image(), dtype=np.float32), window)
    labels = case.labels()
    as_float = torch.from_numpy(np.asarray(labels, dtype=np.float32))[None]
    layers = torch.nn.functional.interpolate(as_float, size=tuple(window), mode="nearest")[0]
    return np.asarray(image, dtype=np.float32), layers.numpy().astype(labels.dtype)
