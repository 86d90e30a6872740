"""A manifest.json listing cases (the layout of the project's shared real CTs, ../shared/data/ct).

    {"cases": [{"id": "...", "image": "<file or DICOM folder>",
                "labels": [{"path": "...", "type": "multilabel" | "binary", "names": {"1": "liver"} | "<names.json>"}]}]}

Paths are relative to the manifest's folder. All label files of a case are combined (a structure named in
several files is their union). Other label types (e.g. DICOM SEG objects) are not read.
"""
from __future__ import annotations

import json
from pathlib import Path

from r1seg_core.errors import InvalidInputError

from r1seg_core.volume import read_volume

from .cases import CaseData, CaseEntry, LabelMap, SourceSpec, entry

READ_TYPES = ("multilabel", "binary")


def list_cases(spec: SourceSpec) -> list[CaseEntry]:
    try:
        manifest = json.loads(spec.path.read_text())
        cases = manifest["cases"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise InvalidInputError(f"{spec.path} is not a manifest with a 'cases' list: {error}") from error
    folder = spec.path.parent
    return [entry(case["id"], _load, folder, case, spec.label_names) for case in cases]


def _names(names, folder: Path) -> dict[int, str]:
    if isinstance(names, str):
        names = json.loads((folder / names).read_text())
    return {int(value): str(name) for value, name in names.items()}


def _load(folder: Path, case: dict, renames: dict[int, str]) -> CaseData:
    label_maps = []
    for label in case.get("labels", []):
        if label.get("type") not in READ_TYPES:
            continue
        path = folder / label["path"]
        label_maps.append(LabelMap(read_volume(path), {**_names(label["names"], folder), **renames}, str(path)))
    if not label_maps:
        raise InvalidInputError(f"no {' or '.join(READ_TYPES)} label file is listed")
    return CaseData(case["id"], read_volume(folder / case["image"]), label_maps)
