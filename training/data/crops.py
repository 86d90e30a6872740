"""Window-sized crops of a prepared case, and which structures each crop holds.

A crop is centred on a voxel of a randomly chosen structure with probability `foreground_ratio` (2:1 in the
reference) and anywhere otherwise, or on a structure the sampler chose; near the border it slides inwards, and a
volume smaller than the window is padded by the predictor's own rule (`inference.windows.pad_to_roi`: symmetric,
with 0), so training and inference see thin scans alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import torch

from r1seg_core.inference.windows import pad_to_roi
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
    whole: bool = False               # the whole case resized to one window (the predictor's global view)
    centre: str | None = None         # the structure the crop was centred on, if any

    def mask(self, name: str) -> np.ndarray:
        if name not in self.index_of and name in self.absent:
            # Annotated by the dataset but absent from the whole case, so it has no index in `layers`.
            return np.zeros(self.image.shape, dtype=bool)
        return (self.layers == self.index_of[name]).any(0)

    def structure_masks(self) -> dict[str, np.ndarray]:
        """Every labelled structure with a voxel in the crop -> its mask."""
        values = set(np.unique(self.layers).tolist()) - {0}
        return {name: (self.layers == index).any(0) for name, index in self.index_of.items() if index in values}


def crop_start(shape, window, centre) -> tuple[int, ...]:
    """The window start that puts `centre` in the middle, slid inside the volume along each axis."""
    return tuple(int(min(max(c - w // 2, 0), max(s - w, 0))) for s, w, c in zip(shape, window, centre))


def _padded(image: np.ndarray, layers: np.ndarray, window) -> tuple[np.ndarray, np.ndarray]:
    """A crop smaller than the window along some axis, padded as the predictor pads a CT (one rule, one owner);
    the label layers are placed on the same padded grid, with 0 (no structure) around."""
    padded, region = pad_to_roi(torch.from_numpy(image), window)
    if padded.shape == image.shape:
        return image, layers
    placed = np.zeros((layers.shape[0], *padded.shape), dtype=layers.dtype)
    placed[(slice(None), *region)] = layers
    return padded.numpy(), placed


def sample_crop(case: PreparedCase, window, settings: CropSettings, rng: np.random.Generator,
                centre_on: str | None = None) -> Crop:
    """A crop of `case`, or with `whole_volume_ratio` the whole case; `centre_on` names a structure of the case to
    centre a crop on."""
    targets = [s for s in case.structures if settings.targets is None or s.name in settings.targets]
    whole = rng.random() < settings.whole_volume_ratio
    if whole:
        image, layers = _whole_volume(case, window)
    else:
        if centre_on is not None or (targets and rng.random() < settings.foreground_ratio):
            structure = (next(s for s in case.structures if s.name == centre_on) if centre_on is not None
                         else targets[rng.integers(len(targets))])
            centre_on = structure.name
            voxels = case.foreground_voxels(structure.index)
            centre = voxels[rng.integers(len(voxels))]
        else:
            centre = [rng.integers(s) for s in case.shape]
        start = crop_start(case.shape, window, centre)
        region = tuple(slice(b, b + w) for b, w in zip(start, window))
        image, layers = _padded(np.asarray(case.image()[region], dtype=np.float32),
                                np.asarray(case.labels()[(slice(None), *region)]), window)
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
    return Crop(image, layers, present, absent, {s.name: s.index for s in case.structures}, whole, centre_on)


def _whole_volume(case: PreparedCase, window) -> tuple[np.ndarray, np.ndarray]:
    """The whole case squeezed into one window: the image as the predictor resizes it, each label layer by nearest
    neighbour."""
    image = resize_to_window(np.asarray(case.image(), dtype=np.float32), window)
    labels = case.labels()
    as_float = torch.from_numpy(np.asarray(labels, dtype=np.float32))[None]
    layers = torch.nn.functional.interpolate(as_float, size=tuple(window), mode="nearest")[0]
    return np.asarray(image, dtype=np.float32), layers.numpy().astype(labels.dtype)
