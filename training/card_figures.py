"""Figures for a trained model's card that `r1seg evaluate` does not give.

    python -m training.card_figures --run runs/default2 --model runs/default2/final --out DIR

- curve.csv and curve.png: held-out validation Dice (the stages' `validation_every_steps`) against training
  minutes since the run began, from each stage's metrics.csv;
- held_out_<report>.json: what the card quotes from an `r1seg evaluate` report (Dice per kind and target, the
  implicit questions' organs, absent-target counts with "not trained" apart);
- sample_ct.json: "Segment the liver." on the bundled sample CT (a training patient) against its TotalSegmentator
  liver: volumes, Dice, the volume marked below the label's lowest slice (the pelvis side), and the seconds taken.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

SAMPLE_LABEL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct" / "totalseg_example" / \
    "example_seg_fast_force_split.nii.gz"
TOTALSEG_LIVER = 5


def validation_curve(run: Path) -> list[dict]:
    """(stage, step, minutes since the run began, val_dice) for every validated step, stages in order."""
    points, elapsed = [], 0.0
    for stage in (1, 2, 3, 4):
        metrics = run / f"stage{stage}" / "metrics.csv"
        if not metrics.is_file():
            continue
        by_step = {}
        with metrics.open() as handle:
            for row in csv.DictReader(handle):
                by_step[int(row["step"])] = row       # a resumed stage logs its steps again: the last one counts
        for step in sorted(by_step):
            row = by_step[step]
            elapsed += float(row["seconds"]) / 60.0
            if row["val_dice"]:
                points.append({"stage": stage, "step": step, "minutes": round(elapsed, 2),
                               "val_dice": round(float(row["val_dice"]), 4)})
    return points


def write_curve(points: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "curve.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["stage", "step", "minutes", "val_dice"])
        writer.writeheader()
        writer.writerows(points)
    figure, axes = plt.subplots(figsize=(6, 3.2), dpi=110)
    for stage in sorted({p["stage"] for p in points}):
        mine = [p for p in points if p["stage"] == stage]
        axes.plot([p["minutes"] for p in mine], [p["val_dice"] for p in mine], "o-", label=f"stage {stage}")
    axes.set_xlabel("training minutes (2-core CPU)")
    axes.set_ylabel("held-out window Dice")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "curve.png")


def sample_ct_liver(model: Path) -> dict:
    from r1seg_core import Predictor, read_volume, sample_ct_path
    from r1seg_core.evaluation.metrics import overlap_scores

    ct = read_volume(sample_ct_path())
    label = read_volume(SAMPLE_LABEL).array == TOTALSEG_LIVER
    predictor = Predictor(model)
    started = time.monotonic()
    result = predictor.ask(ct, "Segment the liver.")
    seconds = time.monotonic() - started
    liver = next(t for t in result.targets if t.name == "liver")
    voxel_ml = ct.voxel_volume_ml
    lowest = int(np.nonzero(label.any((1, 2)))[0].min())
    mask = liver.mask.astype(bool)
    return {"status": liver.status, "predicted_ml": round(float(mask.sum()) * voxel_ml, 1),
            "label_ml": round(float(label.sum()) * voxel_ml, 1),
            "below_lowest_label_slice_ml": round(float(mask[:lowest].sum()) * voxel_ml, 1),
            "dice": round(overlap_scores(mask, label)["dice"], 4), "seconds": round(seconds, 2),
            "answer": result.answer}


def held_out_summary(report: Path) -> dict:
    """The figures the card quotes, from an `r1seg evaluate` report folder's rows: Dice per question kind and
    target, which organ each implicit question found, and the absent-target counts, "not trained" apart."""
    from r1seg_core.evaluation.run import scored_cases

    rows = [row for case in scored_cases(report).values() for row in case["rows"]]
    dice: dict[str, dict[str, float]] = {}
    for row in rows:
        if row["kind"] in ("explicit", "implicit", "multi", "custom") and row["present_gt"]:
            dice.setdefault(row["kind"], {})[row["target"]] = round(row["dice"], 3)
    implicit = [row for row in rows if row["kind"] == "implicit" and row["present_gt"]]
    absent = {}
    for kind in ("absent_in_region", "absent_out_of_region"):
        mine = [row for row in rows if row["kind"] == kind]
        absent[kind] = {"questions": len(mine), "structures": [row["target"] for row in mine],
                        "absent_by_vision": sum(row["status"] == "absent" for row in mine),
                        "not_trained": sum(row["status"] == "not_trained" for row in mine),
                        "found": [row["target"] for row in mine if row["status"] == "present"]}
    return {"dice": dice,
            # The organ the model chose is the one its answer names first, found or not.
            "implicit_right_organ": f"{sum(row['target'] in row['answer'].split('.')[0] for row in implicit)} of "
                                    f"{len(implicit)}",
            "absent": absent,
            "median_seconds": round(float(np.median([row["seconds"] for row in rows])), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="the run folder given to run_stages.sh")
    parser.add_argument("--model", type=Path, help="a model folder to ask about the sample CT")
    parser.add_argument("--report", type=Path, action="append", default=[],
                        help="an `r1seg evaluate` report folder to summarise (repeatable)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    for report in args.report:
        summary = held_out_summary(report)
        (args.out / f"held_out_{report.name}.json").parent.mkdir(parents=True, exist_ok=True)
        (args.out / f"held_out_{report.name}.json").write_text(json.dumps(summary, indent=1))
        print(f"[card] {report.name}: {json.dumps(summary)}")
    args.out.mkdir(parents=True, exist_ok=True)
    points = validation_curve(args.run)
    write_curve(points, args.out)
    print(f"[card] {len(points)} validation points -> {args.out / 'curve.png'}")
    if args.model:
        figures = sample_ct_liver(args.model)
        (args.out / "sample_ct.json").write_text(json.dumps(figures, indent=1))
        print(f"[card] sample CT liver: {json.dumps(figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
