"""The reference's augmentations (MONAI), made safe for left/right targets.

RandRotate90 x3 in the axial plane (p=0.2 each), RandFlip head-feet (p=0.1), RandScaleIntensity 0.1 and
RandShiftIntensity 0.1 (p=0.5 each). Model space is LPS, so "left" is always towards +x. A quarter or half turn in
the axial plane moves the patient's left side to the front, back or right, and a model trained on such crops
cannot tie "left kidney" to a side. So when a question names a left or right structure the rotations are skipped
(the head-feet flip keeps left on the left and stays). Every draw comes from the sample's own seed.

Beyond the reference, for a model trained on a handful of patients (each switched on in the stage file):
- contrast phases: every labelled structure of the crop gets its own HU offset by kind (PHASE_OFFSETS_HU), and a
  vessel may be set to any enhancement from non-contrast to arterial, so one scan's phase is not what an organ
  detector learns;
- a small affine (scale and axial rotation), which keeps left on the left;
- Gaussian noise, as in low-dose CTs.
"""
from __future__ import annotations

import numpy as np

from ..recipe import AugmentSettings

SIDE_WORDS = frozenset({"left", "right"})
# HU offset ranges by kind of structure. Parenchyma enhances by tens of HU between phases, gut wall less, muscle
# little; bone, lung and air do not change and are left alone.
PHASE_OFFSETS_HU = {"parenchyma": (-10.0, 80.0), "hollow organ": (-10.0, 40.0), "muscle": (-5.0, 30.0)}
# A vessel is set to a lumen value drawn from non-contrast (about 40 HU) to arterial (about 400 HU).
VESSEL_LUMEN_HU = (30.0, 400.0)
_KIND_WORDS = (
    ("vessel", ("aorta", "vena cava", "vein", "artery", "arteries", "trunk")),
    ("parenchyma", ("liver", "spleen", "kidney", "pancreas", "adrenal", "heart", "atrium", "ventricle", "myocardium",
                    "thyroid", "prostate")),
    ("hollow organ", ("stomach", "duodenum", "bowel", "colon", "bladder", "esophagus", "rectum")),
    ("muscle", ("muscle", "gluteus", "iliopsoas", "autochthon")),
)


def is_sided(name: str) -> bool:
    """A structure whose name says which side it is on ("left kidney", "right middle lobe", "left atrium")."""
    return bool(SIDE_WORDS & set(name.split()))


def _pipeline(settings: AugmentSettings, rotate: bool):
    from monai.transforms import (Compose, RandAffined, RandFlipd, RandRotate90d, RandScaleIntensityd,
                                  RandShiftIntensityd)

    keys = ("image", "masks")
    steps = []
    if rotate:
        steps += [RandRotate90d(keys, prob=settings.rotate90_prob, max_k=3, spatial_axes=(1, 2), allow_missing_keys=True)
                  for _ in range(settings.rotate90_repeats)]
    if settings.affine_prob > 0:
        # The first spatial axis is z, so a rotation about it turns the axial plane; +-15 degrees keeps left left.
        steps.append(RandAffined(keys, prob=settings.affine_prob, mode=("bilinear", "nearest"), padding_mode="zeros",
                                 rotate_range=(np.deg2rad(settings.affine_rotate_degrees), 0.0, 0.0),
                                 scale_range=(settings.affine_scale,) * 3, allow_missing_keys=True))
    steps += [RandFlipd(keys, prob=settings.flip_z_prob, spatial_axis=0, allow_missing_keys=True),
              RandScaleIntensityd("image", factors=settings.scale_intensity, prob=settings.scale_intensity_prob),
              RandShiftIntensityd("image", offsets=settings.shift_intensity, prob=settings.shift_intensity_prob)]
    return Compose(steps)


def structure_kind(name: str) -> str | None:
    """"vessel", "parenchyma", "hollow organ", "muscle", or None for what contrast does not change."""
    for kind, words in _KIND_WORDS:
        if any(word in name for word in words):
            return kind
    return None


def contrast_phase(image: np.ndarray, structures: dict[str, np.ndarray], hu_min: float, hu_span: float,
                   rng: np.random.Generator) -> np.ndarray:
    """`image` (D, H, W), HU windowed to [0, 1] from `hu_min` over `hu_span` HU, with each structure's voxels moved
    by its own offset; `structures` maps names to their boolean masks in the crop."""
    shifted = image.copy()
    for name, mask in structures.items():
        kind = structure_kind(name)
        if kind is None or not mask.any():
            continue
        if kind == "vessel":
            # A lumen value, not an offset: arterial crops must be able to look non-contrast too.
            lumen = (rng.uniform(*VESSEL_LUMEN_HU) - hu_min) / hu_span
            offset = lumen - float(np.median(image[mask]))
        else:
            offset = rng.uniform(*PHASE_OFFSETS_HU[kind]) / hu_span
        shifted[mask] += offset
    return np.clip(shifted, 0.0, 1.0, out=shifted)


def augment(image: np.ndarray, masks: np.ndarray | None, target_names: list[str], settings: AugmentSettings,
            seed: int, structures: dict[str, np.ndarray] | None = None,
            hu_window: tuple[float, float] = (-1000.0, 1000.0)) -> tuple[np.ndarray, np.ndarray | None]:
    """image (D, H, W) and masks (K, D, H, W) -> the same, augmented alike.

    `structures` (name -> boolean mask of every labelled structure in the crop) drives the contrast-phase
    augmentation; `hu_window` (the HU range the image's [0, 1] covers) sizes it and the noise in HU.
    """
    from monai.utils import convert_to_numpy

    rng = np.random.default_rng(seed)
    hu_min, hu_max = hu_window
    if structures and rng.random() < settings.contrast_phase_prob:
        image = contrast_phase(image, structures, hu_min, hu_max - hu_min, rng)
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
    if rng.random() < settings.noise_prob:
        sigma = rng.uniform(0.0, settings.noise_hu) / (hu_max - hu_min)
        image = np.clip(image + rng.normal(0.0, sigma, image.shape).astype(np.float32), 0.0, 1.0)
    return image, (convert_to_numpy(out["masks"]).astype(np.uint8) if masks is not None else None)
