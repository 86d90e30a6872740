"""M3D-Seg's two processed npy layouts, listed by a Decathlon-style `<code>/<code>.json`.

`m3d_npy` (M3D-LaMed, the original R1Seg-3D data): one json entry per (case, class),
    {"image": ".../<code>/<case>/image.npy", "label": ".../<code>/<case>/masks/mask_<i>.npy"}
    image (1, 32, 256, 256) in [0, 1]; mask (1, 32, 256, 256) bool, or a (1, 1, 1, 1) zero array when class i is
    absent from the case. Class i is index i of the dataset's class list (r1seg_core.vocabulary label map).
`segvol_npy` (SegVol, the "raw" M3D-Seg download): one entry per case,
    {"image": ".../<case>/image.npy", "label": ".../<case>/mask_(C, X, Y, Z).npz"}
    image (1, X, Y, Z) foreground z-scores on the native grid; mask a scipy CSR matrix (C, X*Y*Z), channel c = class c.

Both producers discarded the spacing and orientation, so these arrays are used on their own voxel grid (see
cases.INTENSITIES). The json paths are absolute paths of the producer's machine; they are re-rooted at the
source folder by the part after the dataset code.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from r1seg_core.errors import InvalidInputError
from r1seg_core.evaluation.splits import check_parts_disjoint
from r1seg_core.vocabulary import load_vocabulary
from r1seg_core.volume import Volume

from .cases import CaseData, CaseEntry, LabelMap, SourceSpec, entry

_MASK_INDEX = re.compile(r"mask_(\d+)\.npy$")
_IDENTITY = np.eye(3)


def list_m3d_cases(spec: SourceSpec) -> list[CaseEntry]:
    code, items = _read_list(spec)
    names = _class_names(spec, code)
    cases: dict[Path, list[tuple[int, Path]]] = {}
    for item in items:
        image, label = _reroot(item["image"], spec.path, code), _reroot(item["label"], spec.path, code)
        match = _MASK_INDEX.search(label.name)
        if match is None:
            raise InvalidInputError(f"{spec.path}: label {label} is not named mask_<class index>.npy")
        cases.setdefault(image, []).append((int(match.group(1)), label))
    return [entry(image.parent.name, _load_m3d, image, masks, names) for image, masks in cases.items()]


def list_segvol_cases(spec: SourceSpec) -> list[CaseEntry]:
    code, items = _read_list(spec)
    names = _class_names(spec, code)
    entries = []
    for item in items:
        image, label = _reroot(item["image"], spec.path, code), _reroot(item["label"], spec.path, code)
        case_id = image.parent.name if image.name == "image.npy" else image.name.split(".")[0]
        entries.append(entry(case_id, _load_segvol, case_id, image, label, names))
    return entries


def _read_list(spec: SourceSpec) -> tuple[str, list[dict]]:
    code = spec.path.name
    path = spec.path / f"{code}.json"
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"{path} cannot be read: {error}") from error
    if spec.split not in content:
        raise InvalidInputError(f"{path} has no {spec.split!r} list")
    # spec.split is read; it must not share cases with another part (a test-set leak).
    check_parts_disjoint(content, path)
    return code, content[spec.split]


def _class_names(spec: SourceSpec, code: str) -> dict[int, str]:
    """Class index -> name: the vocabulary's map for the dataset code, then the source's own overrides."""
    dataset, vocabulary = spec.dataset or code, load_vocabulary()
    names = vocabulary.dataset_label_map(dataset) if dataset in vocabulary.datasets() else {}
    return {**names, **spec.label_names}


def _reroot(path: str, folder: Path, code: str) -> Path:
    original = Path(path)
    if original.is_file():
        return original
    parts = original.parts
    if code not in parts:
        return folder / original
    return folder.joinpath(*parts[len(parts) - parts[::-1].index(code):])


def _nominal_volume(array: np.ndarray, name: str) -> Volume:
    # 1 mm and identity stand for "unknown": these volumes are never resampled (geometry_known=False).
    return Volume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), _IDENTITY, name=name)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError) as error:
        raise InvalidInputError(f"{path}: cannot read it as a numpy array ({error})") from error


def _load_m3d(image_path: Path, masks: list[tuple[int, Path]], names: dict[int, str]) -> CaseData:
    image = _load_npy(image_path)
    if image.ndim != 4 or image.shape[0] != 1:
        raise InvalidInputError(f"{image_path}: expected an array of shape (1, D, H, W), got {image.shape}")
    label_maps = []
    for index, path in sorted(masks):
        mask = _load_npy(path)
        if mask.size == 1:
            mask = np.zeros(image.shape, dtype=np.uint8)     # M3D's placeholder for "class absent from this case"
        if mask.shape != image.shape:
            raise InvalidInputError(f"{path}: mask shape {mask.shape} differs from the image's {image.shape}, and the "
                                    "npy layout has no geometry to match them by position")
        names_of_mask = {1: names[index]} if index in names else {}
        label_maps.append(LabelMap(_nominal_volume(mask[0].astype(np.uint8), path.name), names_of_mask, str(path)))
    volume = _nominal_volume(image[0].astype(np.float32), image_path.parent.name)
    return CaseData(image_path.parent.name, volume, label_maps, intensity="unit", geometry_known=False)


def _load_segvol(case_id: str, image_path: Path, mask_path: Path, names: dict[int, str]) -> CaseData:
    image = _load_npy(image_path)
    if image.ndim != 4 or image.shape[0] != 1:
        raise InvalidInputError(f"{image_path}: expected an array of shape (1, X, Y, Z), got {image.shape}")
    spatial = image.shape[1:]
    channels = _read_csr_rows(mask_path, int(np.prod(spatial)))
    # Channel c holds class index c (label value c + 1 in the source): value c + 1 keeps 0 for background.
    label_names = {c + 1: names[c] for c in range(len(channels)) if c in names}
    maps = []
    for layer in _layers(channels, int(np.prod(spatial))):
        # SegVol stored (X, Y, Z); the project's arrays are (z, y, x).
        volume = _nominal_volume(layer.reshape(spatial).transpose(2, 1, 0), mask_path.name)
        maps.append(LabelMap(volume, label_names, str(mask_path)))
    return CaseData(case_id, _nominal_volume(image[0].transpose(2, 1, 0).astype(np.float32), case_id), maps,
                    intensity="zscore", geometry_known=False)


def _read_csr_rows(path: Path, voxels: int) -> list[np.ndarray]:
    """The flat voxel indices of each row of a scipy.sparse CSR matrix saved with save_npz (read without scipy)."""
    try:
        with np.load(path) as npz:
            fmt, shape = npz["format"].item(), tuple(npz["shape"])
            indices, indptr = npz["indices"], npz["indptr"]
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise InvalidInputError(f"{path}: not a sparse mask saved by scipy.sparse.save_npz ({error})") from error
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    if fmt != "csr" or shape[1] != voxels:
        raise InvalidInputError(f"{path}: expected a CSR matrix of shape (C, {voxels}), found {fmt} {shape}")
    return [indices[indptr[c]:indptr[c + 1]] for c in range(shape[0])]


def _layers(channels: list[np.ndarray], voxels: int) -> list[np.ndarray]:
    """Pack one-hot channels into label arrays; a channel overlapping earlier ones goes to a further array."""
    dtype = np.uint8 if len(channels) < 255 else np.uint16
    layers: list[np.ndarray] = []
    for c, where in enumerate(channels):
        if not len(where):
            continue
        target = next((layer for layer in layers if not layer[where].any()), None)
        if target is None:
            target = np.zeros(voxels, dtype=dtype)
            layers.append(target)
        target[where] = c + 1
    return layers or [np.zeros(voxels, dtype=dtype)]
