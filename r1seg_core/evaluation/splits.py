"""M3D-Seg style split files: one JSON object whose "train" and "test" lists name the cases of each part.

    {"labels": {"1": "liver"}, "train": [{"image": ".../s0001/ct.nii.gz", "label": "..."}, ...], "test": [...]}

Entries are objects with an "image" (and usually a "label" and an "id") or plain case id strings. Training reads
only the "train" part (training/data, `split: train`) and evaluation only the "test" part; a case listed in
both would leak test data into training, so reading any part of a split file refuses such a file.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InvalidInputError

SPLIT_PARTS = ("train", "validation", "test")
# File names that say nothing about the case: the case is then named by its folder (TotalSegmentator's
# <case>/ct.nii.gz, M3D's <case>/image.npy).
_GENERIC_STEMS = ("ct", "image", "img", "volume")
_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".npy", ".npz")


def is_split_file(content) -> bool:
    return isinstance(content, dict) and any(isinstance(content.get(part), list) for part in SPLIT_PARTS)


def case_id_of(entry) -> str:
    """An entry's case id: its "id", else the image's file name without suffix (or its folder's, see above)."""
    if isinstance(entry, str):
        return entry
    if not isinstance(entry, dict) or not (entry.get("id") or entry.get("image")):
        raise InvalidInputError(f"split entry {entry!r} is neither a case id nor an object with an 'id' or 'image'")
    if entry.get("id"):
        return str(entry["id"])
    image = Path(str(entry["image"]).rstrip("/"))
    stem = image.name
    for suffix in _SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return image.parent.name if stem.lower() in _GENERIC_STEMS else stem


def check_parts_disjoint(content: dict, source) -> None:
    """Raise InvalidInputError naming the cases that more than one part of a split lists."""
    owners: dict[str, str] = {}
    for part in SPLIT_PARTS:
        for case_id in dict.fromkeys(case_id_of(entry) for entry in content.get(part) or []):
            if case_id in owners:
                raise InvalidInputError(
                    f"{source}: case {case_id!r} is in both the {owners[case_id]!r} and the {part!r} part of the "
                    "split; a case must be in one part only (training would see test data)")
            owners[case_id] = part


def split_part(content: dict, part: str, source) -> list:
    """The entries of one part of an already-read split file, after checking that its parts are disjoint."""
    if part not in SPLIT_PARTS:
        raise InvalidInputError(f"{source}: split part {part!r} is not one of {', '.join(SPLIT_PARTS)}")
    check_parts_disjoint(content, source)
    entries = content.get(part)
    if not isinstance(entries, list):
        raise InvalidInputError(f"{source}: the split has no {part!r} list")
    return entries


def read_json_file(path, what: str):
    """A JSON file's content; an unreadable or invalid file raises InvalidInputError saying which `what` it is."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise InvalidInputError(f"{path}: cannot read the {what} ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"{path}: the {what} is not valid JSON ({error})") from None


def read_split_file(path) -> dict:
    content = read_json_file(path, "split file")
    if not is_split_file(content):
        raise InvalidInputError(f"{path}: not a split file (an object with 'train' / 'test' lists)")
    return content


def split_case_ids(path, part: str) -> list[str]:
    """The case ids of one part of a split file (training's `split_file` + `split`)."""
    return [case_id_of(entry) for entry in split_part(read_split_file(path), part, path)]
