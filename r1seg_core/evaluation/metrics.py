"""Per-mask scores on the CT's own grid: Dice (F1), precision, sensitivity, IoU and HD95 in mm.

Definitions (the report states them too):
  * overlap scores come from the voxel counts TP, FP, FN: Dice = 2TP / (2TP + FP + FN), precision = TP / (TP + FP),
    sensitivity = TP / (TP + FN), IoU = TP / (TP + FP + FN);
  * a score whose denominator is 0 is 1 when both masks are empty (nothing to find, nothing found) and 0
    otherwise (an empty prediction of a present target has precision 0, not "undefined");
  * HD95 is MONAI's: the larger of the two directed 95th percentiles of the distances between the masks'
    surface voxels, in mm from the grid's spacing. Both masks empty: 0. Exactly one empty: inf (no surface to
    measure to); the report's means leave inf out and count such rows separately.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

SCORES = ("dice", "precision", "sensitivity", "iou", "hd95_mm")


def _ratio(numerator: int, denominator: int, both_empty: bool) -> float:
    if denominator == 0:
        return 1.0 if both_empty else 0.0
    return numerator / denominator


def overlap_scores(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    prediction, truth = prediction.astype(bool, copy=False), truth.astype(bool, copy=False)
    tp = int(np.count_nonzero(prediction & truth))
    fp = int(np.count_nonzero(prediction)) - tp
    fn = int(np.count_nonzero(truth)) - tp
    both_empty = tp + fp + fn == 0
    return {"dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
            "precision": _ratio(tp, tp + fp, both_empty),
            "sensitivity": _ratio(tp, tp + fn, both_empty),
            "iou": _ratio(tp, tp + fp + fn, both_empty)}


def _box_with_margin(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of `mask`'s voxels plus one voxel on every side, in the coordinates of np.pad(mask, 1)."""
    where = np.argwhere(mask)
    return tuple(slice(low, high + 3) for low, high in zip(where.min(0), where.max(0)))


def hd95_mm(prediction: np.ndarray, truth: np.ndarray, spacing_xyz) -> float:
    """MONAI's 95th-percentile Hausdorff distance in mm; masks are (z, y, x), the spacing in ITK's (x, y, z)."""
    prediction, truth = prediction.astype(bool, copy=False), truth.astype(bool, copy=False)
    has_prediction, has_truth = prediction.any(), truth.any()
    if not has_prediction and not has_truth:
        return 0.0
    if not (has_prediction and has_truth):
        return math.inf
    # Distances only need the union's bounding box; a margin of background keeps surfaces at its border surfaces.
    box = _box_with_margin(prediction | truth)
    pair = [torch.from_numpy(np.pad(mask, 1)[box].copy())[None, None].float() for mask in (prediction, truth)]
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 warns about an argument its own internals pass; nothing the caller can change.
        warnings.simplefilter("ignore", FutureWarning)
        distance = compute_hausdorff_distance(pair[0], pair[1], include_background=True, percentile=95,
                                              spacing=[float(s) for s in spacing_xyz[::-1]])
    return float(distance.item())


def score_masks(prediction: np.ndarray, truth: np.ndarray, spacing_xyz) -> dict[str, float]:
    return {**overlap_scores(prediction, truth), "hd95_mm": hd95_mm(prediction, truth, spacing_xyz)}
