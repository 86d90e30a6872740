"""Set an exported model's presence volume and its list of trained structures, from training patients only.

    python -m training.calibrate --recipe training/recipes/default-smollm2 --model runs/x/final
        [--data-list training/recipes/default-smollm2/calibration.json] [--slabs 3]

The answer rule (r1seg_core/inference/decision.py) calls a trained target present when the decoder's fused mask
holds at least `presence_min_ml`. This script asks the model for every trained structure on each training CT of
the data list, cut into `--slabs` axial slabs (so organs that lie outside a slab give absent examples inside the
scanned body, and each slab's encoding serves all its questions), records the volume the decoder marked, and
writes into the model's config.json:
- `known_structures`: the recipe's stage-1 targets, the only structures the model was trained to segment;
- `presence_min_ml`: the volume that misclassifies the fewest (structure, slab) observations (the midpoint, in log
  volume, of the gap it falls in; the lowest of equally good ones), either one for all structures or one per
  structure. Organs differ by two orders of magnitude (a slab's aorta holds 20 mL, its liver 700 mL), but a structure
  has only a few slabs to fit its own volume on; so the form is chosen on the training slabs too: the one that
  misclassifies fewer observations when each observation is left out of the fit in turn (ties: one volume). The
  observations of one slab share its image, so this is a milder test than leaving whole slabs out. The held-out
  patient chooses nothing here.
The observations, and both forms' leave-one-out errors, are kept in calibration.json beside config.json, for the
model card. `--refit` fits again from a model's kept observations, without asking the model.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from r1seg_core.config import CONFIG_NAME
from r1seg_core.evaluation.cases import load_case, read_data_list
from r1seg_core.volume import Volume

from .recipe import load_recipe

PRESENT_MIN_ML = 5.0         # a reference mask smaller than this in a slab is neither a fair positive nor an absence


def slabs(volume: Volume, masks: dict[str, np.ndarray], count: int):
    """`count` axial slabs of the CT (1: the whole CT): (name, Volume, {structure: mask})."""
    depth = volume.array.shape[0]
    for index in range(count):
        start, stop = depth * index // count, depth * (index + 1) // count
        # Voxel axis k runs along direction column 2, spacing[2] mm a slice.
        origin = np.asarray(volume.origin) + np.asarray(volume.direction)[:, 2] * start * volume.spacing[2]
        part = Volume(np.ascontiguousarray(volume.array[start:stop]), volume.spacing, tuple(origin), volume.direction)
        yield f"slab{index + 1}of{count}", part, {name: mask[start:stop] for name, mask in masks.items()}


def observe(predictor, data_list: Path, structures: list[str], slab_count: int) -> list[dict]:
    """One row per (CT or slab, structure): the volume the decoder marked and whether the label holds it."""
    rows = []
    for case in read_data_list(data_list).cases:
        volume, masks, _ = load_case(case)      # label values without a class name are not used
        voxel_ml = volume.voxel_volume_ml
        for part, image, labels in slabs(volume, masks, slab_count):
            for name in structures:
                if name not in case.annotated:
                    continue            # unlabelled here: neither present nor known to be absent
                reference_ml = float(labels[name].sum()) * voxel_ml if name in labels else 0.0
                if 0 < reference_ml < PRESENT_MIN_ML:
                    continue
                result = predictor.ask(image, f"Segment the {name}.")
                target = next(t for t in result.targets if t.name == name)
                rows.append({"case": case.case_id, "part": part, "structure": name, "reference_ml": reference_ml,
                             "present": reference_ml > 0, "marked_ml": float(target.marked_ml or 0.0)})
                print(f"[calibrate] {case.case_id} {part} {name}: marked {rows[-1]['marked_ml']:.1f} mL, "
                      f"label {reference_ml:.1f} mL", flush=True)
    return rows


def best_threshold(rows: list[dict]) -> tuple[float, int]:
    """The volume that misclassifies the fewest rows (present needs marked >= it), and that number of errors."""
    marked = sorted({row["marked_ml"] for row in rows} | {0.0})
    candidates = [(low + high) / 2 if low == 0 else math.sqrt(low * high) for low, high in zip(marked, marked[1:])]
    candidates = candidates or [1.0]

    def errors(threshold: float) -> int:
        return sum((row["marked_ml"] >= threshold) != row["present"] for row in rows)

    fewest = min(errors(t) for t in candidates)
    # Of equally good volumes the lowest: a faint organ reported is checked by the reader; a missed one is lost.
    return float(min(t for t in candidates if errors(t) == fewest)), fewest


def fit_per_structure(rows: list[dict]) -> tuple[dict[str, float], int]:
    """One volume per structure seen in `rows`, and the errors they make together."""
    thresholds, errors = {}, 0
    for name in dict.fromkeys(row["structure"] for row in rows):
        threshold, wrong = best_threshold([row for row in rows if row["structure"] == name])
        thresholds[name] = round(threshold, 2)
        errors += wrong
    return thresholds, errors


def leave_one_out_errors(rows: list[dict], per_structure: bool) -> int:
    """Observations misclassified by a volume fitted without them: how each form does on one it has not seen."""
    errors = 0
    for index, row in enumerate(rows):
        others = [other for position, other in enumerate(rows) if position != index]
        same = [other for other in others if other["structure"] == row["structure"]]
        # A structure's only slab left out: the volume of all the others stands in for its own.
        threshold = round(best_threshold(same)[0], 2) if per_structure and same else best_threshold(others)[0]
        errors += (row["marked_ml"] >= threshold) != row["present"]
    return errors


def fit_presence(rows: list[dict]) -> dict:
    """`presence_min_ml` in the form that misclassifies fewer training observations left out of its fit, and the
    record."""
    loo = {"one volume": leave_one_out_errors(rows, False), "per structure": leave_one_out_errors(rows, True)}
    if loo["per structure"] < loo["one volume"]:
        presence, errors, form = *fit_per_structure(rows), "per structure"
    else:
        threshold, errors = best_threshold(rows)
        presence, form = round(threshold, 2), "one volume"
    return {"presence_min_ml": presence, "form": form, "leave_one_out_errors": loo, "misclassified": errors}


def calibrate(recipe_dir: Path, model_dir: Path, data_list: Path, slab_count: int, refit: bool = False) -> dict:
    structures = list(load_recipe(recipe_dir).stages[1].crops.targets)
    config_path = model_dir / CONFIG_NAME
    config = json.loads(config_path.read_text())
    if refit:
        kept = json.loads((model_dir / "calibration.json").read_text())
        data_list, slab_count, rows = kept["data_list"], kept["slabs"], kept["observations"]
    else:
        from r1seg_core.inference.predictor import Predictor

        predictor = Predictor(model_dir)
        # The observations need the decoder's raw volumes: no presence volume while measuring (set in memory
        # only, so a failed run leaves config.json as it was).
        predictor.model.config.known_structures, predictor.model.config.presence_min_ml = structures, None
        rows = observe(predictor, data_list, structures, slab_count)
    fitted = fit_presence(rows)
    config.update(known_structures=structures, presence_min_ml=fitted["presence_min_ml"])
    config_path.write_text(json.dumps(config, indent=1) + "\n")
    record = {"data_list": str(data_list), "slabs": slab_count, **fitted, "observations": rows}
    (model_dir / "calibration.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path, help="an exported model folder (stage 1 or final)")
    parser.add_argument("--data-list", type=Path, help="training CTs with labels (default: the recipe's "
                                                       "calibration.json)")
    parser.add_argument("--slabs", type=int, default=3, help="axial slabs per CT (1: the whole CT)")
    parser.add_argument("--refit", action="store_true", help="fit again from the model's calibration.json "
                                                             "observations, without asking the model")
    args = parser.parse_args(argv)
    record = calibrate(args.recipe, args.model, args.data_list or args.recipe / "calibration.json", args.slabs,
                       args.refit)
    print(f"[calibrate] presence_min_ml {record['presence_min_ml']} (mL, {record['form']}; leave-one-out errors "
          f"{record['leave_one_out_errors']}), {record['misclassified']} of {len(record['observations'])} "
          f"(structure, slab) pairs misclassified; written to {args.model / CONFIG_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
