"""The reference's augmentations (MONAI), made safe for left/right targets.

RandRotate90 x3 in the axial plane (p=0.2 each), RandFlip head-feet (p=0.1), RandScaleIntensity 0.1 and
RandShiftIntensity 0.1 (p=0.5 each). Model space is LPS, so "left" is always towards +x. A quarter or half turn in
the axial plane moves the patient's left side to the front, back or right, and a model trained on such crops
cannot tie "left kidney" to a side. So when a question names a left or right structure the rotations are skipped
(the head-feet flip keeps left on the left and stays). Every draw comes from the sample's own seed.
"""
from __future__ import annotations

import numpy as np

from ..recipe import AugmentSettings

SIDE_WORDS = frozenset({"left", "right"})


def is_sided(name: str) -> bool:
    """A structure whose name says which side it is on ("left kidney", "right middle lobe", "left atrium")."""
    return bool(SIDE_WORDS & set(name.split()))


def _pipeline(settings: AugmentSettings, rotate: bool):
    from monai.transforms import Compose, RandFlipd, RandRotate90d, RandScaleIntensityd, RandShiftIntensityd

    keys = ("image", "masks")
    steps = []
    if rotate:
        steps += [RandRotate90d(keys, prob=settings.rotate90_prob, max_k=3, spatial_axes=(1, 2), allow_missing_keys=True)
                  for _ in range(settings.rotate90_repeats)]
    steps += [RandFlipd(keys, prob=settings.flip_z_prob, spatial_axis=0, allow_missing_keys=True),
              RandScaleIntensityd("image", factors=settings.scale_intensity, prob=settings.scale_intensity_prob),
              RandShiftIntensityd("image", offsets=settings.shift_intensity, prob=settings.shift_intensity_prob)]
    return Compose(steps)


def augment(image: np.ndarray, masks: np.ndarray | None, target_names: list[str], settings: AugmentSettings,
            seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """image (D, H, W) and masks (K, D, H, W) -> the same, augmented alike."""
    from monai.utils import convert_to_numpy

    rotate = not any(is_sided(name) for name in target_names)
    if rotate and image.shape[1] != image.shape[2]:
        rotate = False          # a quarter turn of a non-square window would change its shape
    pipeline = _pipeline(settings, rotate)
    pipeline.set_random_state(seed=seed)
    data = {"image": image[None]}
    if masks is not None:
        data["masks"] = masks
    out = pipeline(data)
    image = convert_to_numpy(out["image"])[0].astype(np.float32)
    return image, (convert_to_numpy(out["masks"]).astype(np.uint8) if masks is not None else None)
