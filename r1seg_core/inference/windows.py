"""Sliding-window tiling of a model-space CT and Gaussian-weighted blending of per-window answers.

Tiling follows MONAI's `sliding_window_inference` rule, so a model trained and validated with
MONAI sees the same windows here: along each axis the stride is int(roi * (1 - overlap)) (at
least 1) and the last window is moved back to end flush with the volume. All shapes are (z, y, x).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

Start = tuple[int, int, int]


def window_starts(shape_zyx, roi_zyx, overlap: float) -> list[Start]:
    """Corner of every window, z slowest; together they cover every voxel.

    The volume must be at least one window large along each axis (pad with `pad_to_roi` first).
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    _check_same_rank(shape_zyx, roi_zyx)
    per_axis = [_axis_starts(int(size), int(roi), overlap) for size, roi in zip(shape_zyx, roi_zyx)]
    return list(itertools.product(*per_axis))


def _axis_starts(size: int, roi: int, overlap: float) -> list[int]:
    if roi < 1 or size < roi:
        raise ValueError(f"an axis of {size} voxels cannot hold a window of {roi}; pad it with pad_to_roi first")
    stride = max(int(roi * (1.0 - overlap)), 1)
    count = math.ceil((size - roi) / stride) + 1
    return [min(index * stride, size - roi) for index in range(count)]


def pad_to_roi(array: torch.Tensor, roi_zyx, value: float = 0.0) -> tuple[torch.Tensor, tuple[slice, slice, slice]]:
    """Pad a (D, H, W) tensor symmetrically (the odd voxel at the end) up to at least one window.

    Returns the padded tensor (the input itself when no axis is short) and the slices that crop
    a result on the padded grid back to the original one.
    """
    _check_same_rank(array.shape, roi_zyx)
    shortfalls = [max(int(roi) - size, 0) for size, roi in zip(array.shape, roi_zyx)]
    before = [shortfall // 2 for shortfall in shortfalls]
    crop = tuple(slice(start, start + size) for start, size in zip(before, array.shape))
    if not any(shortfalls):
        return array, crop
    # F.pad lists (before, after) pairs from the last axis to the first.
    padding = [amount for axis in reversed(range(3)) for amount in (before[axis], shortfalls[axis] - before[axis])]
    return F.pad(array, padding, mode="constant", value=value), crop


def extract_windows(volume: torch.Tensor, starts: list[Start], roi_zyx) -> torch.Tensor:
    """The windows of a (D, H, W) tensor at `starts`, stacked as a (N, 1, d, h, w) model batch."""
    _check_same_rank(volume.shape, roi_zyx)
    return torch.stack([volume[window_region(start, roi_zyx)] for start in starts]).unsqueeze(1)


def window_region(start: Start, roi_zyx) -> tuple[slice, slice, slice]:
    """The slices that cut the window at `start` out of its volume."""
    return tuple(slice(int(corner), int(corner) + int(length)) for corner, length in zip(start, roi_zyx))


def gaussian_importance_map(
    roi_zyx, sigma_scale: float = 0.125, min_value: float = 1e-3, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Per-voxel blending weight of a window, the same as MONAI's "gaussian" importance map.

    A product of 1D Gaussians exp(-d^2 / 2 sigma^2), d the offset from the window centre and
    sigma = sigma_scale * window length; 1 at the centre of odd-length axes. Weights never fall
    below min_value, so a voxel that only window edges cover still gets a defined average.
    """
    if sigma_scale <= 0 or not 0 < min_value <= 1:
        raise ValueError(f"need sigma_scale > 0 and 0 < min_value <= 1, got {sigma_scale} and {min_value}")
    z, y, x = (_gaussian_profile(int(length), sigma_scale * int(length), device) for length in roi_zyx)
    weights = z[:, None, None] * y[None, :, None] * x[None, None, :]
    return weights.clamp(min=min_value).to(dtype)


def _gaussian_profile(length: int, sigma: float, device) -> torch.Tensor:
    offsets = torch.arange(length, dtype=torch.float32, device=device) - (length - 1) / 2.0
    return torch.exp(-0.5 * (offsets / sigma) ** 2)


class WindowStitcher:
    """Importance-weighted average of overlapping per-window values (probabilities or logits) over a volume."""

    def __init__(self, shape_zyx, roi_zyx, importance: torch.Tensor, device=None, background: float = 0.0):
        self.shape_zyx = tuple(int(size) for size in shape_zyx)
        self.roi_zyx = tuple(int(length) for length in roi_zyx)
        _check_same_rank(self.shape_zyx, self.roi_zyx)
        if tuple(importance.shape) != self.roi_zyx:
            raise ValueError(
                f"importance map of shape {tuple(importance.shape)} does not match the window {self.roi_zyx}"
            )
        device = importance.device if device is None else torch.device(device)
        self._importance = importance.to(device=device, dtype=torch.float32)
        self._weighted_sum = torch.zeros(self.shape_zyx, device=device)
        self._weight_sum = torch.zeros(self.shape_zyx, device=device)
        # The value of an "absent" window: probability 0, or the original's logit -1000 (which vetoes its voxels).
        self.background = float(background)

    def add(self, values: torch.Tensor, starts: list[Start]) -> None:
        """Accumulate a batch of window answers (B, d, h, w) taken at `starts`."""
        if values.ndim != 4 or tuple(values.shape[1:]) != self.roi_zyx or values.shape[0] != len(starts):
            raise ValueError(
                f"expected values of shape ({len(starts)}, *{self.roi_zyx}) for {len(starts)} windows, "
                f"got {tuple(values.shape)}"
            )
        values = values.detach().to(self._importance.device, torch.float32)
        for window, start in zip(values, starts):
            region = self._region(start)
            # In place, without a weighted copy of the batch: stitching allocates no memory of its own.
            self._weighted_sum[region].addcmul_(window, self._importance)
            self._weight_sum[region] += self._importance

    def add_background(self, starts: list[Start]) -> None:
        """Windows whose answer is "absent": they count, with the background value, without a tensor to build."""
        for start in starts:
            region = self._region(start)
            if self.background:
                self._weighted_sum[region].add_(self._importance, alpha=self.background)
            self._weight_sum[region] += self._importance

    def result(self) -> torch.Tensor:
        """The weighted average (D, H, W); voxels that no window covered get the background value."""
        # One volume-sized float allocation, not four: where no window counted, 0 / 0 gives NaN, then the background.
        average = self._weighted_sum / self._weight_sum
        return average.masked_fill_(self._weight_sum == 0, self.background)

    def _region(self, start: Start) -> tuple[slice, slice, slice]:
        if len(start) != 3 or any(
            corner < 0 or corner + length > size for corner, length, size in zip(start, self.roi_zyx, self.shape_zyx)
        ):
            raise ValueError(f"a window at {tuple(start)} of size {self.roi_zyx} does not fit in {self.shape_zyx}")
        return window_region(start, self.roi_zyx)


def _check_same_rank(shape_zyx, roi_zyx) -> None:
    if len(shape_zyx) != 3 or len(roi_zyx) != 3:
        raise ValueError(f"expected a 3D (z, y, x) shape and window, got {tuple(shape_zyx)} and {tuple(roi_zyx)}")
