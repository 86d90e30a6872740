"""The prepared-data cache: each case in model space, with its spacing, ready for crop sampling.

    <data>/<source>/index.json                 the source's cases, preprocessing, problems and notes (written last)
    <data>/<source>/<case>/image.npy           float16 (D, H, W) in [0, 1] on the canonical grid
    <data>/<source>/<case>/labels.npy          uint8/uint16 (L, D, H, W): structure index per voxel, L layers so
                                               that overlapping structures (aorta and its lumen) both fit
    <data>/<source>/<case>/foreground.npz      per structure, up to FOREGROUND_SAMPLES voxel coordinates
    <data>/<source>/<case>/case.json           structures (index, name, voxels), annotated-but-absent names,
                                               spacing, origin, intensity, notes

Arrays are opened memory-mapped, so a crop reads only its own pages.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from r1seg_core.errors import InvalidInputError
from r1seg_core.preprocess import PreprocessConfig

INDEX_NAME = "index.json"
CASE_NAME = "case.json"
FOREGROUND_SAMPLES = 2000
# Cases whose foreground samples one process keeps (about 2 MB for a TotalSegmentator case, least recently used
# dropped first): a DataLoader worker touches thousands of cases over a long run, and a cache per case object grew
# to gigabytes per worker.
FOREGROUND_CACHE_CASES = 64


@dataclass(frozen=True)
class StructureEntry:
    index: int          # the value that marks it in labels.npy
    name: str           # canonical vocabulary name
    voxels: int


@dataclass
class PreparedCase:
    source: str
    folder: Path
    meta: dict

    @property
    def case_id(self) -> str:
        return self.meta["case_id"]

    @cached_property
    def structures(self) -> list[StructureEntry]:
        return [StructureEntry(**s) for s in self.meta["structures"]]

    @property
    def absent(self) -> list[str]:
        """Structures the dataset annotates that have no voxel in this case: safe negatives anywhere in it."""
        return self.meta["absent"]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["shape_zyx"])

    def image(self) -> np.ndarray:
        return np.load(self.folder / "image.npy", mmap_mode="r")

    def labels(self) -> np.ndarray:
        return np.load(self.folder / "labels.npy", mmap_mode="r")

    def foreground_voxels(self, index: int) -> np.ndarray:
        """(n, 3) sample of the (z, y, x) voxels of structure `index`."""
        return _foreground(self.folder)[str(index)]


@lru_cache(maxsize=FOREGROUND_CACHE_CASES)
def _foreground(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "foreground.npz") as npz:
        return {key: npz[key] for key in npz.files}


@dataclass
class PreparedSource:
    name: str
    folder: Path
    index: dict

    @cached_property
    def cases(self) -> list[PreparedCase]:
        return [PreparedCase(self.name, self.folder / case_id, json.loads((self.folder / case_id / CASE_NAME).read_text()))
                for case_id in self.index["cases"]]

    @property
    def preprocess(self) -> dict:
        return self.index["preprocess"]

    @cached_property
    def hu_window(self) -> tuple[float, float]:
        """The HU window the source's images were scaled from, read once, not per sample."""
        config = PreprocessConfig.from_dict(self.preprocess)
        return config.hu_min, config.hu_max

    def pair_count(self) -> int:
        """(case, structure) pairs with the structure present in the case."""
        return sum(len(case.structures) for case in self.cases)

    def annotated_pair_count(self) -> int:
        """(case, structure) pairs of every structure the dataset annotates, present or absent in the case (one
        that vanished at the model's spacing is neither)."""
        return sum(len(case.structures) + len(case.absent) for case in self.cases)


def write_case(folder: Path, image: np.ndarray, layers: np.ndarray, foreground: dict[int, np.ndarray], meta: dict) -> None:
    """Write one case atomically: into a temporary folder, renamed into place when complete."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    np.save(partial / "image.npy", image.astype(np.float16))
    np.save(partial / "labels.npy", layers)
    np.savez(partial / "foreground.npz", **{str(k): v for k, v in foreground.items()})
    (partial / CASE_NAME).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def open_source(data_dir: Path, name: str) -> PreparedSource:
    folder = Path(data_dir) / name
    index = folder / INDEX_NAME
    if not index.is_file():
        raise InvalidInputError(f"prepared dataset {name!r} not found at {folder}: run "
                                f"`python -m training.data.prepare --recipe <recipe> --output {data_dir}` first")
    return PreparedSource(name, folder, json.loads(index.read_text()))
