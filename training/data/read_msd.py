"""Medical Segmentation Decathlon and nnU-Net raw layouts: dataset.json, imagesTr/, labelsTr/.

MSD: `labels` maps "value" -> name and `training` lists {"image", "label"} paths (and optionally the case "id";
by default the label file's name; training.data.convert writes ids where files of several cases share a name).
nnU-Net v2: `labels` maps name -> value, `file_ending` gives the suffix, and case `X` is
`imagesTr/X_0000<ending>` with `labelsTr/X<ending>` (one CT channel).
"""
from __future__ import annotations

import json
from pathlib import Path

from r1seg_core.errors import InvalidInputError

from r1seg_core.volume import read_volume

from .cases import CaseData, CaseEntry, LabelMap, SourceSpec, entry

NNUNET_CHANNEL = "_0000"


def list_cases(spec: SourceSpec) -> list[CaseEntry]:
    description = _read_dataset_json(spec.path / "dataset.json")
    names = {**_label_names(description, spec.path), **spec.label_names}
    names.pop(0, None)  # background
    pairs = _msd_pairs(description, spec.path) if "training" in description else _nnunet_pairs(description, spec.path)
    return [entry(case_id, _load, case_id, image, label, names) for case_id, image, label in pairs]


def _read_dataset_json(path: Path) -> dict:
    if not path.is_file():
        raise InvalidInputError(f"{path} is missing: an MSD / nnU-Net dataset folder has a dataset.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"{path} is not valid JSON: {error}") from error


def _label_names(description: dict, folder: Path) -> dict[int, str]:
    labels = description.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise InvalidInputError(f"{folder / 'dataset.json'} has no 'labels' object")
    names = {}
    for key, value in labels.items():
        if str(key).isdigit():                    # MSD: {"1": "liver"}
            names[int(key)] = str(value)
        elif isinstance(value, int):              # nnU-Net v2: {"liver": 1}
            names[value] = str(key)
        else:
            raise InvalidInputError(f"{folder / 'dataset.json'}: label {key!r} -> {value!r} is a region (a list of "
                                    "values); only one value per structure is supported")
    return names


def _case_id(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _msd_pairs(description: dict, folder: Path) -> list[tuple[str, Path, Path]]:
    pairs = []
    for item in description["training"]:
        image, label = folder / item["image"], folder / item["label"]
        pairs.append((item.get("id") or _case_id(label), image, label))
    return pairs


def _nnunet_pairs(description: dict, folder: Path) -> list[tuple[str, Path, Path]]:
    ending = description.get("file_ending", ".nii.gz")
    pairs = []
    for label in sorted((folder / "labelsTr").glob(f"*{ending}")):
        case_id = label.name[: -len(ending)]
        pairs.append((case_id, folder / "imagesTr" / f"{case_id}{NNUNET_CHANNEL}{ending}", label))
    return pairs


def _load(case_id: str, image: Path, label: Path, names: dict[int, str]) -> CaseData:
    return CaseData(case_id, read_volume(image), [LabelMap(read_volume(label), names, str(label))])
