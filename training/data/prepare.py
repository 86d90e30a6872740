"""Prepare a recipe's datasets: read each case, move it into model space, name its structures, cache it.

    python -m training.data.prepare --recipe training/recipes/tiny --output runs/tiny/data [--workers 8]

A bad case (unreadable file, label grid that does not belong to the CT, a label the vocabulary does not know,
only empty masks) is skipped with a message naming it; the messages are printed and kept in the source's
index.json. The preparation fails when a source ends up with no usable case, or on any problem with --strict.
"""
from __future__ import annotations

import argparse
import json
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from r1seg_core.errors import InvalidInputError
from r1seg_core.preprocess import ModelGrid, PreprocessConfig, to_model_space
from r1seg_core.vocabulary import load_vocabulary
from r1seg_core.volume import LOST_FOREGROUND_TOLERANCE, lost_foreground, validate_ct

from .cases import CaseData, CaseEntry, LabelMap, SourceSpec, case_error, list_cases
from .geometry import describe_grid, labels_to_model_grid, same_grid
from .prepared import CASE_NAME, FOREGROUND_SAMPLES, INDEX_NAME, write_case

NOTES_SHOWN = 20


def preparation_key(spec: SourceSpec, preprocess: PreprocessConfig) -> dict:
    """Everything a prepared case depends on; a cache made with another key is prepared again."""
    key = {"preprocess": preprocess.to_dict(), "source": {**asdict(spec), "path": str(spec.path)}}
    return json.loads(json.dumps(key))      # as it reads back from case.json (string keys, lists)


def prepare_case(spec: SourceSpec, case: CaseEntry, preprocess: PreprocessConfig, out_dir: Path) -> list[str]:
    """Prepare one case into out_dir/<case>; returns notes, raises InvalidInputError naming the case."""
    try:
        data = case.load()
    except (InvalidInputError, OSError, ValueError, KeyError) as error:
        raise case_error(spec.name, case.case_id, str(error)) from error
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(f"case {spec.name}/{case.case_id}: {text}")

    image, grid = _image_in_model_space(spec, data, preprocess)
    structures: dict[str, int] = {}          # canonical name -> index in labels.npy
    layers: list[np.ndarray] = []
    annotated: set[str] = set()
    for label_map in data.label_maps:
        named, values = _named_values(spec, data.case_id, label_map, note)
        annotated.update(named.values())
        if not values.size:
            note(f"mask {label_map.path} is empty")
        labels = _labels_in_model_space(spec, data, label_map, grid, image.shape)
        earlier = set(structures)
        repeated = sorted({named[value] for value in values if value in named} & earlier)
        if repeated:
            # Two label maps of one structure (a case with the full and the fast TotalSegmentator output) would
            # otherwise be placed as two layers and read as their union: the first map's mask is kept.
            note(f"{label_map.path} labels {', '.join(repeated)} again; the earlier label map's masks are kept")
        for value in values:
            if value in named and named[value] not in earlier:
                index = structures.setdefault(named[value], len(structures) + 1)
                _place(layers, labels == value, index, image.shape)
    if not structures:
        raise case_error(spec.name, data.case_id, "every mask is empty (or its labels were skipped): the case has no "
                         "structure to learn from")
    stacked = np.stack(layers).astype(np.uint8 if len(structures) < 255 else np.uint16)
    voxels = _voxel_counts(stacked, len(structures))
    entries, foreground = [], {}
    rng = np.random.default_rng(zlib.crc32(data.case_id.encode()))   # str hash() differs per process
    for name, index in structures.items():
        if voxels[index] == 0:
            # Present in the source but thinner than one model voxel: neither a positive nor a safe negative.
            note(f"{name} vanished when resampled to {preprocess.spacing_zyx} mm and is left out")
            continue
        entries.append({"index": index, "name": name, "voxels": int(voxels[index])})
        foreground[index] = _sample_voxels(stacked, index, rng)
    if not entries:
        raise case_error(spec.name, data.case_id, f"no structure is left at {preprocess.spacing_zyx} mm")
    absent = sorted(annotated - set(structures))
    meta = {"case_id": data.case_id, "source": spec.name, "shape_zyx": list(image.shape), "intensity": data.intensity,
            "spacing_zyx": list(grid.spacing_zyx) if grid else None, "origin": list(grid.origin) if grid else None,
            "structures": entries, "absent": absent, "notes": notes, "prepared_with": preparation_key(spec, preprocess)}
    write_case(out_dir / data.case_id, image, stacked, foreground, meta)
    return notes


def _image_in_model_space(spec: SourceSpec, data: CaseData, preprocess: PreprocessConfig):
    if data.intensity == "hu":
        try:
            validate_ct(data.image)
        except InvalidInputError as error:
            raise case_error(spec.name, data.case_id, str(error)) from error
        return to_model_space(data.image, preprocess)
    array = data.image.array.astype(np.float32)
    if data.intensity == "zscore":
        low, high = float(array.min()), float(array.max())
        array = (array - low) / max(high - low, 1e-6)
    return np.clip(array, 0.0, 1.0), None


def _named_values(spec: SourceSpec, case_id: str, label_map: LabelMap, note) -> tuple[dict[int, str], np.ndarray]:
    """The map's non-zero label values, and value -> canonical name for those the vocabulary knows."""
    array = label_map.volume.array
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        if not np.array_equal(array, np.round(array)):
            raise case_error(spec.name, case_id, f"label file {label_map.path} holds non-integer values")
    values = np.unique(array)
    if values.size and values[0] < 0:
        raise case_error(spec.name, case_id, f"label file {label_map.path} holds negative values")
    values = values[values != 0].astype(int)
    vocabulary = load_vocabulary()
    named = {}
    for value in sorted(set(values) | set(label_map.names)):
        raw = label_map.names.get(value)
        structure = vocabulary.lookup(raw, spec.vocabulary_dataset) if raw is not None else None
        if structure is not None:
            named[value] = structure.name
            continue
        problem = (f"label value {value} of {label_map.path} has no name in the dataset's label list" if raw is None else
                   f"label {value} {raw!r} of {label_map.path} is not in the vocabulary (r1seg_core/vocabulary) nor "
                   f"among dataset {spec.vocabulary_dataset!r}'s published_names in datasets.json; add it there or "
                   "map it with label_names in data.yaml")
        if spec.unknown_labels == "error":
            raise case_error(spec.name, case_id, problem)
        note(f"{problem}: skipped")
    return named, values


def _labels_in_model_space(spec: SourceSpec, data: CaseData, label_map: LabelMap, grid: ModelGrid | None,
                           shape: tuple[int, int, int]) -> np.ndarray:
    volume = label_map.volume
    if grid is None:
        if volume.shape != shape:
            raise case_error(spec.name, data.case_id, f"label {label_map.path} has shape {volume.shape} but the image "
                             f"{shape}, and this layout has no geometry to match them by position")
        return volume.array
    resampled = labels_to_model_grid(volume, grid)
    if not same_grid(volume, data.image):
        lost = lost_foreground(volume, resampled, grid.spacing_zyx[::-1])
        if lost > LOST_FOREGROUND_TOLERANCE:
            raise case_error(spec.name, data.case_id, (
                f"label {label_map.path} lies on another grid ({describe_grid(volume)}) than the CT "
                f"({describe_grid(data.image)}) and {lost:.0%} of its foreground falls outside the CT: "
                "it does not belong to this scan"))
    return resampled


def _place(layers: list[np.ndarray], mask: np.ndarray, index: int, shape) -> None:
    """Write a structure into the first layer where it overlaps nothing else (or where it already is)."""
    for layer in layers:
        if np.all(np.isin(layer[mask], (0, index))):
            layer[mask] = index
            return
    layer = np.zeros(shape, dtype=np.uint16)
    layer[mask] = index
    layers.append(layer)


def _voxel_counts(layers: np.ndarray, count: int) -> np.ndarray:
    return sum(np.bincount(layer.ravel(), minlength=count + 1) for layer in layers)


def _sample_voxels(layers: np.ndarray, index: int, rng: np.random.Generator) -> np.ndarray:
    where = np.argwhere((layers == index).any(0))
    if len(where) > FOREGROUND_SAMPLES:
        where = where[rng.choice(len(where), FOREGROUND_SAMPLES, replace=False)]
    return where.astype(np.int32)


def _prepare_one(args) -> tuple[str, list[str], str | None]:
    spec, case, preprocess, out_dir, reuse = args
    done = out_dir / case.case_id / CASE_NAME
    if reuse and done.is_file():
        # Left by an interrupted preparation (cases are renamed into place when complete).
        meta = json.loads(done.read_text())
        if meta.get("prepared_with") == preparation_key(spec, preprocess):
            return case.case_id, meta["notes"], None
    try:
        return case.case_id, prepare_case(spec, case, preprocess, out_dir), None
    except InvalidInputError as error:
        return case.case_id, [], str(error)


def prepare_source(spec: SourceSpec, preprocess: PreprocessConfig, data_dir: Path, workers: int = 1,
                   reuse: bool = True) -> dict:
    """Prepare every case of one source (reusing cases already prepared alike); writes and returns its index."""
    out_dir = Path(data_dir) / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = list_cases(spec)
    jobs = [(spec, case, preprocess, out_dir, reuse) for case in cases]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_prepare_one, jobs))
    else:
        results = [_prepare_one(job) for job in jobs]
    index = {"source": spec.name, "preprocess": preprocess.to_dict(), "prepared_with": preparation_key(spec, preprocess),
             "cases": [case_id for case_id, _, problem in results if problem is None],
             "problems": [problem for _, _, problem in results if problem is not None],
             "notes": [text for _, notes, _ in results for text in notes]}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=1))
    return index


def is_prepared(spec: SourceSpec, preprocess: PreprocessConfig, data_dir: Path) -> bool:
    index = Path(data_dir) / spec.name / INDEX_NAME
    if not index.is_file():
        return False
    content = json.loads(index.read_text())
    return (content.get("prepared_with") == preparation_key(spec, preprocess)
            and all((index.parent / case / CASE_NAME).is_file() for case in content["cases"]))


def main(argv: list[str] | None = None) -> int:
    from ..recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, type=Path, help="recipe folder (its data.yaml and model.yaml)")
    parser.add_argument("--output", required=True, type=Path, help="folder of the prepared data")
    parser.add_argument("--workers", type=int, default=1, help="cases prepared in parallel")
    parser.add_argument("--force", action="store_true", help="prepare again even where the cache is complete")
    parser.add_argument("--strict", action="store_true", help="fail on any bad case instead of skipping it")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe)
    preprocess = PreprocessConfig.from_dict(recipe.model_config().preprocess)
    failed = False
    for spec in recipe.sources:
        if not args.force and is_prepared(spec, preprocess, args.output):
            print(f"[prepare] {spec.name}: already prepared in {args.output / spec.name}")
            continue
        index = prepare_source(spec, preprocess, args.output, args.workers, reuse=not args.force)
        print(f"[prepare] {spec.name}: {len(index['cases'])} cases ready, {len(index['problems'])} skipped")
        for text in index["notes"][:NOTES_SHOWN]:
            print(f"[prepare]   note: {text}")
        if len(index["notes"]) > NOTES_SHOWN:
            print(f"[prepare]   ... {len(index['notes']) - NOTES_SHOWN} more notes in {args.output / spec.name / INDEX_NAME}")
        for text in index["problems"]:
            print(f"[prepare]   SKIPPED {text}", file=sys.stderr)
        failed |= not index["cases"] or (args.strict and bool(index["problems"]))
    if failed:
        print("[prepare] failed: a source has no usable case (or --strict and a case was skipped)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
