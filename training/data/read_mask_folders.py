"""Folders of one binary mask per structure (the TotalSegmentator dataset layout).

    <root>/<case>/ct.nii.gz
    <root>/<case>/segmentations/<structure>.nii.gz      (value 1 inside, 0 outside; the file stem names it)
"""
from __future__ import annotations

from pathlib import Path

from r1seg_core.errors import InvalidInputError

from r1seg_core.volume import read_volume

from .cases import CaseData, CaseEntry, LabelMap, SourceSpec, entry

MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def list_cases(spec: SourceSpec) -> list[CaseEntry]:
    entries = []
    for folder in sorted(p for p in spec.path.iterdir() if p.is_dir()):
        if (folder / spec.image_name).is_file() or (folder / spec.masks_dir).is_dir():
            entries.append(entry(folder.name, _load, folder, spec.image_name, spec.masks_dir))
    return entries


def _structure_name(path: Path) -> str:
    for suffix in MASK_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _load(folder: Path, image_name: str, masks_dir: str) -> CaseData:
    masks = sorted(p for p in (folder / masks_dir).glob("*") if p.name.endswith(MASK_SUFFIXES))
    if not masks:
        raise InvalidInputError(f"{folder / masks_dir} holds no mask files ({', '.join(MASK_SUFFIXES)})")
    # A per-structure file is a label map with the single value 1, named by its file.
    label_maps = [LabelMap(read_volume(path), {1: _structure_name(path)}, str(path)) for path in masks]
    return CaseData(folder.name, read_volume(folder / image_name), label_maps)
