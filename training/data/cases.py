"""What every reader delivers: one case's CT and label maps, with their geometry, plus the source settings.

Readers only list and read files. Matching grids, naming structures and resampling happen once, in `prepare`,
so every layout gets the same checks and the same messages.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from r1seg_core.errors import InvalidInputError
from r1seg_core.volume import Volume

LAYOUTS = ("m3d_npy", "segvol_npy", "msd", "mask_folders", "manifest")
# "hu": Hounsfield units, resampled and windowed like inference input. The npy layouts stored arrays that their
# producers had already normalised and resized, so no HU window and no spacing can be recovered:
# "unit" = already in [0, 1] (M3D), "zscore" = foreground z-scores (SegVol), rescaled to [0, 1] per case.
INTENSITIES = ("hu", "unit", "zscore")


@dataclass
class LabelMap:
    """An integer label volume and the dataset's name for each of its label values."""
    volume: Volume
    names: dict[int, str]
    path: str                       # where it came from, for messages


@dataclass
class CaseData:
    case_id: str
    image: Volume
    label_maps: list[LabelMap]
    intensity: str = "hu"
    # False for the npy layouts: their arrays carry no geometry and are used on their own voxel grid.
    geometry_known: bool = True


@dataclass(frozen=True)
class CaseEntry:
    """A case found by a reader; `load` reads its files (in a worker process) and names the case in any error."""
    case_id: str
    load: Callable[[], CaseData]


@dataclass
class SourceSpec:
    """One dataset to prepare, as `data.yaml` describes it."""
    name: str                                   # the prepared dataset's name, used by the stage files
    layout: str
    path: Path
    dataset: str | None = None                  # r1seg_core.vocabulary datasets.json entry (M3D-Seg code,
                                                # totalsegmentator_v2); default: the folder's name
    label_names: dict[int, str] = field(default_factory=dict)   # label value -> name, overriding the dataset's own
    cases: list[str] | None = None              # only these case ids
    split: str = "train"                        # the part of the split read: the npy layouts' json, or split_file
    split_file: str | None = None               # an M3D-Seg style split (train/test lists) for the other layouts
    unknown_labels: str = "error"               # "error": reject the case; "skip": drop the label (both reported)
    image_name: str = "ct.nii.gz"               # mask_folders: the CT file in each case folder
    masks_dir: str = "segmentations"            # mask_folders: the folder of per-structure masks

    @property
    def vocabulary_dataset(self) -> str:
        """The datasets.json entry whose label map and published label names apply to this source."""
        return self.dataset or self.path.name

    @classmethod
    def from_dict(cls, data: dict, base: Path) -> "SourceSpec":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise InvalidInputError(f"data source {data.get('name')!r}: unknown settings {sorted(unknown)}")
        missing = {"name", "layout", "path"} - set(data)
        if missing:
            raise InvalidInputError(f"data source {data.get('name')!r}: missing {sorted(missing)}")
        values = dict(data)
        # Cluster paths usually live in environment variables ($DATA_ROOT/...); relative paths are relative to the recipe.
        where = f"{base / 'data.yaml'}, source {data['name']!r}"
        values["path"] = (base / expand_variables(str(values["path"]), where, "path")).resolve()
        values["label_names"] = {int(k): str(v) for k, v in (values.get("label_names") or {}).items()}
        if values.get("split_file"):
            values["split_file"] = str((base / expand_variables(str(values["split_file"]), where, "split_file")).resolve())
        spec = cls(**values)
        if spec.layout not in LAYOUTS:
            raise InvalidInputError(f"data source {spec.name!r}: layout {spec.layout!r} is not one of {', '.join(LAYOUTS)}")
        if spec.unknown_labels not in ("error", "skip"):
            raise InvalidInputError(f"data source {spec.name!r}: unknown_labels must be 'error' or 'skip'")
        return spec


_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_variables(value: str, where: str, key: str) -> str:
    """`value` with its environment variables expanded; one left unset is an error naming the file, key and variable.

    os.path.expandvars leaves an unset variable as it is, and "${R1SEG_MODELS}/Phi-3" would then fail hours later,
    on another node, as a missing folder. (DeepSpeed's multi-node runner drops variables it does not forward.)
    """
    expanded = os.path.expandvars(value)
    left = _VARIABLE.search(expanded)
    if left:
        raise InvalidInputError(f"{where}: {key} {value!r} uses {left.group(0)}, which is not set in this process's "
                                "environment; export it (on every node: training/run_stages.sh forwards R1SEG_* "
                                "variables) or write the path out")
    return expanded


def case_error(source: str, case_id: str, problem: str) -> InvalidInputError:
    return InvalidInputError(f"case {source}/{case_id}: {problem}")


def list_cases(spec: SourceSpec) -> list[CaseEntry]:
    """The cases of one source, in a stable order, filtered by `spec.cases`."""
    from . import read_m3d, read_manifest, read_mask_folders, read_msd

    readers = {"m3d_npy": read_m3d.list_m3d_cases, "segvol_npy": read_m3d.list_segvol_cases, "msd": read_msd.list_cases,
               "mask_folders": read_mask_folders.list_cases, "manifest": read_manifest.list_cases}
    if not spec.path.exists():
        raise InvalidInputError(f"data source {spec.name!r}: {spec.path} does not exist")
    entries = _in_split(spec, readers[spec.layout](spec))
    if spec.cases is not None:
        wanted = set(spec.cases)
        missing = wanted - {e.case_id for e in entries}
        if missing:
            raise InvalidInputError(f"data source {spec.name!r}: cases {sorted(missing)} are not in {spec.path}")
        entries = [e for e in entries if e.case_id in wanted]
    return sorted(entries, key=lambda e: e.case_id)


def _in_split(spec: SourceSpec, entries: list[CaseEntry]) -> list[CaseEntry]:
    """Only the cases of `spec.split`; a split file that puts a case in two parts is refused (a test-set leak)."""
    from r1seg_core.evaluation.splits import split_case_ids

    if spec.layout in ("m3d_npy", "segvol_npy") or spec.split_file is None:
        return entries          # the npy layouts' reader takes spec.split from the dataset's own json (read_m3d.py)
    wanted = set(split_case_ids(spec.split_file, spec.split))
    # A split written for other case names (M3D-Seg's "img0001" for a converted "0001") would quietly train on a
    # fraction of the part, or on nothing.
    unmatched = sorted(wanted - {e.case_id for e in entries})
    if unmatched:
        found = sorted(e.case_id for e in entries)
        raise InvalidInputError(
            f"data source {spec.name!r}: {len(unmatched)} of the {len(wanted)} {spec.split!r} cases of "
            f"{spec.split_file} are not in {spec.path} (e.g. {unmatched[:3]}; its cases are named like {found[:3]}); "
            "write the split file with the converted cases' ids, or remove the cases the download lacks")
    return [e for e in entries if e.case_id in wanted]


def entry(case_id: str, loader: Callable, *args) -> CaseEntry:
    """A CaseEntry whose loader can be pickled to a worker process (a module-level function and its arguments)."""
    return CaseEntry(case_id, partial(loader, *args))
