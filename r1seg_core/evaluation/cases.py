"""The cases an evaluation scores: a data list (or the test part of a split file) read, checked and loaded.

A data list is a JSON file holding one of
  * a list of cases;
  * {"dataset": ..., "classes": ..., "cases": [...]}, whose "dataset" and "classes" apply to every case;
  * an M3D-Seg style split {"labels"/"classes": ..., "train": [...], "test": [...]} (the "test" part is read).
A case: {"id": "...", "image": CT file or DICOM folder, "label": multi-label file or folder of one-structure masks,
         "classes": {"5": "liver"} or a JSON file of such an id -> name map, "dataset": "...",
         "questions": [{"question": "...", "targets": ["liver"]}]}
Relative paths are relative to the list file's folder. Class names go through the vocabulary (synonyms and
TotalSegmentator names work); a folder's masks are named by their file names. `classes` may name only some of the
label's values: only the named structures are scored, and the others are left out (the report lists them).

Everything that can be checked without scoring is checked for every case before the first one is scored, so a bad
entry stops the run at once with a message naming it: missing files, unknown class names, a label grid that does
not overlap the image's, a case in two parts of a split.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InvalidInputError
from ..model.packaged import file_sha256
from ..vocabulary import load_vocabulary
from ..volume import LOST_FOREGROUND_TOLERANCE, Volume, lost_foreground, read_volume, resample_labels
from .splits import case_id_of, is_split_file, read_json_file, split_part

CASE_KEYS = frozenset({"id", "image", "label", "classes", "dataset", "questions"})
MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
DEFAULT_DATASET = "default"


@dataclass(frozen=True)
class CustomQuestion:
    text: str
    targets: tuple[str, ...]


@dataclass(frozen=True)
class EvalCase:
    case_id: str
    dataset: str
    image: Path
    label: Path
    classes: dict[int, str]             # multi-label file: label value -> canonical name; empty for a mask folder
    masks: dict[str, Path]              # mask folder: canonical name -> file; empty for a multi-label file
    questions: tuple[CustomQuestion, ...] = ()

    @property
    def annotated(self) -> tuple[str, ...]:
        """The structures the label annotates: absent from the label means absent from the scan."""
        return tuple(dict.fromkeys([*self.classes.values(), *self.masks]))


@dataclass(frozen=True)
class DataList:
    path: Path
    sha256: str
    split: str | None                   # the part read when the list is a split file
    cases: tuple[EvalCase, ...]


def read_data_list(path, split: str = "test") -> DataList:
    """Read and check a data list; raises InvalidInputError naming the first bad entry."""
    path = Path(path)
    content = read_json_file(path, "data list")
    folder = path.resolve().parent
    defaults, entries, part = _entries(content, path, split)
    cases = tuple(_case(entry, index, defaults, folder, path) for index, entry in enumerate(entries))
    if not cases:
        raise InvalidInputError(f"{path}: the data list has no cases")
    seen: set[str] = set()
    for case in cases:
        if case.case_id in seen:
            raise InvalidInputError(f"{path}: case id {case.case_id!r} appears twice")
        seen.add(case.case_id)
    for case in cases:
        check_grids_overlap(case)
    return DataList(path.resolve(), file_sha256(path), part, cases)


def _entries(content, path: Path, split: str) -> tuple[dict, list, str | None]:
    if isinstance(content, list):
        return {}, content, None
    if is_split_file(content):
        defaults = {"dataset": content.get("dataset"), "classes": content.get("classes") or content.get("labels")}
        return defaults, split_part(content, split, path), split
    if isinstance(content, dict) and isinstance(content.get("cases"), list):
        return {"dataset": content.get("dataset"), "classes": content.get("classes")}, content["cases"], None
    raise InvalidInputError(f"{path}: expected a list of cases, an object with a 'cases' list, or a split file "
                            "with 'train' / 'test' lists")


def _case(entry, index: int, defaults: dict, folder: Path, list_path: Path) -> EvalCase:
    where = f"{list_path}: case {index + 1}"
    if not isinstance(entry, dict):
        raise InvalidInputError(f"{where} is {entry!r}, not an object with 'image' and 'label'")
    unknown = set(entry) - CASE_KEYS
    missing = {"image", "label"} - set(entry)
    if unknown or missing:
        raise InvalidInputError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    case_id = case_id_of(entry)
    where = f"{list_path}: case {case_id!r}"
    image, label = _existing(entry["image"], folder, where, "image"), _existing(entry["label"], folder, where, "label")
    classes, masks = {}, {}
    if label.is_dir():
        masks = _mask_files(label, where)
    else:
        classes = _classes(entry.get("classes") or defaults.get("classes"), folder, where)
    questions = tuple(_custom_question(q, where) for q in entry.get("questions") or ())
    unannotated = sorted({t for q in questions for t in q.targets} - {*classes.values(), *masks})
    if unannotated:
        raise InvalidInputError(f"{where}: custom questions ask for {unannotated}, which the label does not "
                                "annotate, so their answers cannot be scored; name their label values in 'classes' "
                                "or drop those questions")
    dataset = str(entry.get("dataset") or defaults.get("dataset") or DEFAULT_DATASET)
    return EvalCase(case_id, dataset, image, label, classes, masks, questions)


def _resolve(value, folder: Path) -> Path:
    # Cluster data usually lives under an environment variable ($DATA_ROOT/...).
    return (folder / os.path.expandvars(str(value))).resolve()


def _existing(value, folder: Path, where: str, what: str) -> Path:
    path = _resolve(value, folder)
    if not path.exists():
        raise InvalidInputError(f"{where}: the {what} {path} does not exist")
    return path


def canonical_name(raw: str, where: str) -> str:
    structure = load_vocabulary().lookup(str(raw))
    if structure is None:
        raise InvalidInputError(f"{where}: class name {raw!r} is not in the vocabulary (r1seg_core/vocabulary); "
                                "use a structure name or synonym it knows, or leave that value out of 'classes' "
                                "(unnamed label values are not scored)")
    return structure.name


def _classes(classes, folder: Path, where: str) -> dict[int, str]:
    if classes is None:
        raise InvalidInputError(f"{where}: a multi-label file needs 'classes' (label value -> name, or a JSON file "
                                "of such a map)")
    if isinstance(classes, str):
        classes = read_json_file(_existing(classes, folder, where, "classes file"), "classes file")
    if not isinstance(classes, dict) or not all(str(key).isdigit() for key in classes):
        raise InvalidInputError(f"{where}: classes must map integer label values to names, e.g. "
                                f'{{"5": "liver", "1": "spleen"}}, got {classes!r}')
    return {int(value): canonical_name(name, f"{where}: label {value}")
            for value, name in classes.items() if int(value) != 0 and str(name).lower() != "background"}


def _structure_of_file(path: Path) -> str:
    name = path.name
    return next(name[: -len(suffix)] for suffix in MASK_SUFFIXES if name.endswith(suffix))


def _mask_files(folder: Path, where: str) -> dict[str, Path]:
    files = sorted(p for p in folder.iterdir() if p.name.endswith(MASK_SUFFIXES))
    if not files:
        raise InvalidInputError(f"{where}: the label folder {folder} holds no mask files ({', '.join(MASK_SUFFIXES)})")
    masks: dict[str, Path] = {}
    for path in files:
        name = canonical_name(_structure_of_file(path), f"{where}: mask {path.name}")
        if name in masks:
            raise InvalidInputError(f"{where}: masks {masks[name].name} and {path.name} both name {name!r}")
        masks[name] = path
    return masks


def _custom_question(question, where: str) -> CustomQuestion:
    if not isinstance(question, dict) or not isinstance(question.get("question"), str) or not question.get("targets"):
        raise InvalidInputError(f"{where}: a custom question is {{'question': text, 'targets': [names]}}, "
                                f"got {question!r}")
    targets = tuple(canonical_name(t, f"{where}: question {question['question']!r}") for t in question["targets"])
    return CustomQuestion(question["question"], targets)


# ---- geometry ------------------------------------------------------------------------------------------------

def _grid_of_file(path: Path) -> tuple:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InvalidInputError(f"{path}: cannot read it as an image") from None
    return reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()


def _grid_of(path: Path) -> tuple:
    """(size, spacing, origin, direction) in ITK order; a header read for files, the series for DICOM folders."""
    if path.is_file():
        return _grid_of_file(path)
    volume = read_volume(path)
    return volume.shape[::-1], volume.spacing, volume.origin, tuple(volume.direction.ravel())


def _physical_box(grid: tuple) -> tuple[np.ndarray, np.ndarray]:
    size, spacing, origin, direction = grid
    matrix = np.reshape(direction, (3, 3)) * np.asarray(spacing)     # column c: the step along voxel axis c
    corners = np.array([[i, j, k] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5)
                        for k in (-0.5, size[2] - 0.5)])
    points = np.asarray(origin) + corners @ matrix.T
    return points.min(0), points.max(0)


def check_grids_overlap(case: EvalCase) -> None:
    """A label whose grid does not even overlap its image's in space cannot be this scan's label."""
    image_low, image_high = _physical_box(_grid_of(case.image))
    for label in [case.label] if case.classes else list(case.masks.values()):
        label_low, label_high = _physical_box(_grid_of(label))
        if np.any(label_low >= image_high) or np.any(label_high <= image_low):
            raise InvalidInputError(
                f"case {case.case_id!r}: the label {label} lies on a grid that does not overlap the image's in space "
                f"(label {np.round(label_low, 1).tolist()} … {np.round(label_high, 1).tolist()} mm, image "
                f"{np.round(image_low, 1).tolist()} … {np.round(image_high, 1).tolist()} mm): it belongs to another scan")


def _on_image_grid(labels: Volume, image: Volume, case: EvalCase, path: Path) -> np.ndarray:
    resampled = resample_labels(labels, image)
    lost = lost_foreground(labels, resampled, image.spacing)
    if lost > LOST_FOREGROUND_TOLERANCE:
        raise InvalidInputError(f"case {case.case_id!r}: {lost:.0%} of the label {path}'s foreground "
                                "falls outside the image: it does not belong to this scan")
    return resampled


def load_case(case: EvalCase) -> tuple[Volume, dict[str, np.ndarray], dict[int, int]]:
    """The CT, each annotated structure's mask (bool, on the CT's own grid; empty when absent), and the label
    values that `classes` does not name, with their voxel counts: those are left out of the scores."""
    image = read_volume(case.image)
    masks: dict[str, np.ndarray] = {}
    unnamed: dict[int, int] = {}
    if case.classes:
        labels = _on_image_grid(read_volume(case.label), image, case, case.label)
        values, counts = np.unique(labels, return_counts=True)
        unnamed = {int(v): int(n) for v, n in zip(values, counts) if v != 0 and int(v) not in case.classes}
        for value, name in case.classes.items():
            masks[name] = masks.get(name, np.zeros(image.shape, dtype=bool)) | (labels == value)
    for name, path in case.masks.items():
        masks[name] = _on_image_grid(read_volume(path), image, case, path) > 0
    return image, masks, unnamed
