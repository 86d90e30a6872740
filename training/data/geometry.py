"""Labels follow their CT into model space by physical position, never by array index.

The CT goes through `r1seg_core.preprocess.to_model_space` exactly as at inference; each label map is resampled
onto the same canonical grid with nearest-neighbour interpolation (one pass for all labels of a map, and label
values never blend). A label map whose grid differs from its CT's is accepted when its foreground lands inside
the CT's field of view, and rejected when it does not, because then it belongs to another scan or crop.
"""
from __future__ import annotations

import numpy as np

from r1seg_core.preprocess import ModelGrid
from r1seg_core.volume import Volume, resample_labels_to_grid

# Labels written by other tools carry float32 geometry; these tolerances absorb that rounding only.
_SPACING_RTOL = 1e-4
_ORIGIN_ATOL_MM = 1e-3
_DIRECTION_ATOL = 1e-4


def same_grid(a: Volume, b: Volume) -> bool:
    return (a.shape == b.shape and np.allclose(a.spacing, b.spacing, rtol=_SPACING_RTOL)
            and np.allclose(a.origin, b.origin, atol=_ORIGIN_ATOL_MM)
            and np.allclose(a.direction, b.direction, atol=_DIRECTION_ATOL))


def describe_grid(volume: Volume) -> str:
    spacing = " x ".join(f"{s:g}" for s in volume.spacing)
    origin = ", ".join(f"{o:.1f}" for o in volume.origin)
    return f"shape (z, y, x) {volume.shape}, spacing {spacing} mm, origin ({origin})"


def labels_to_model_grid(labels: Volume, grid: ModelGrid) -> np.ndarray:
    """An integer label volume -> the same labels (uint16) on the model grid; 0 outside its field of view."""
    # The canonical grid's direction is the identity.
    return resample_labels_to_grid(labels, grid.shape_zyx, grid.spacing_zyx[::-1], grid.origin, np.eye(3))
