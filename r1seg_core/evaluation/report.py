"""Tables from the per-question rows: the paper's Tables 1, 2 and 4 (segmentation), Table 3 (target presence)
and the cost of an answer, as report.md (one run) or compare.md (two runs side by side).

Which rows go where:
  * segmentation (Dice/F1, precision, sensitivity, IoU, HD95): rows whose target is present in the ground truth;
    means and standard deviations over those rows; HD95 over its finite values, with the rows where the model
    found nothing ("missed", HD95 inf) counted beside it;
  * presence: rows of the absent-target kinds; a non-empty prediction is a false positive (FP), an empty one a
    true negative (TN); specificity SPE = TN / (TN + FP), by vision alone over the targets the model was trained
    on, and over all rows with the "not trained" rule (the model declines such targets without looking);
  * a target's status (the answer's decision: present, absent, not_trained, or not_named when the answer never
    named it) is counted apart: "not trained" is never a miss nor a true negative of the vision;
  * cost: one value per question (a multi-target question's rows share it): wall seconds and peak memory.
"""
from __future__ import annotations

import csv
import io
import math
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..files import write_text_atomically
from .metrics import SCORES
from .questions import ABSENT_KINDS

# The statuses of a target in `AnswerResult.to_dict()` that the tables tell apart, and the row's own "not named".
PRESENT, NOT_TRAINED, NOT_NAMED = "present", "not_trained", "not_named"

FIELDS = ("id", "dataset", "target", "kind", "tag", "question", "answer", "predicted_targets", "status", *SCORES,
          "present_gt", "present_pred", "gt_voxels", "pred_voxels", "seconds", "peak_memory_mb", "mask")
_FLOATS = (*SCORES, "seconds", "peak_memory_mb")
_INTEGERS = ("gt_voxels", "pred_voxels")
_BOOLEANS = ("present_gt", "present_pred")
OVERALL = "Overall"


# ---- rows on disk -------------------------------------------------------------------------------------------

def write_rows(path: Path, rows: list[dict]) -> None:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(path, stream.getvalue())


def _parsed(row: dict) -> dict:
    parsed = dict(row)
    for key in _FLOATS:
        parsed[key] = float(row[key])          # "inf" reads back as math.inf
    for key in _INTEGERS:
        parsed[key] = int(row[key])
    for key in _BOOLEANS:
        parsed[key] = row[key] == "True"
    # Rows written before statuses were recorded: the mask was the decision.
    parsed["status"] = row.get("status") or ("present" if parsed["present_pred"] else "absent")
    return parsed


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return [_parsed(row) for row in csv.DictReader(stream)]


# ---- aggregation ----------------------------------------------------------------------------------------------

def segmentation_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row["present_gt"] and row["kind"] not in ABSENT_KINDS]


def presence_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row["kind"] in ABSENT_KINDS]


def grouped(rows: list[dict], key: str | None) -> dict[str, list[dict]]:
    """The rows under "Overall" (key None) or per value of `key`, in order of first appearance."""
    if key is None:
        return {OVERALL: rows} if rows else {}
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row[key]), []).append(row)
    return groups


def mean_std(values) -> tuple[float, float, int]:
    """Mean and (population) standard deviation of the finite values, and how many there were."""
    finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    if not finite.size:
        return math.nan, math.nan, 0
    return float(finite.mean()), float(finite.std()), int(finite.size)


def segmentation_summary(rows: list[dict]) -> dict:
    summary = {"n": len(rows)}
    for score in SCORES:
        summary[score] = mean_std(row[score] for row in rows)[:2]
    hd95 = [row["hd95_mm"] for row in rows]
    summary["hd95_median"] = float(np.median([v for v in hd95 if math.isfinite(v)])) if any(map(math.isfinite, hd95)) else math.nan
    summary["not_trained"] = sum(row["status"] == NOT_TRAINED for row in rows)
    summary["missed"] = sum(not row["present_pred"] for row in rows) - summary["not_trained"]
    return summary


def presence_summary(rows: list[dict]) -> dict:
    """FP, TN and SPE by vision alone (targets the model was trained on), and SPE with the not-trained rule."""
    not_trained = sum(row["status"] == NOT_TRAINED for row in rows)
    trained = [row for row in rows if row["status"] != NOT_TRAINED]
    false_positives = sum(row["present_pred"] for row in trained)
    true_negatives = len(trained) - false_positives
    return {"n": len(rows), "not_trained": not_trained, "fp": false_positives, "tn": true_negatives,
            "specificity_vision": true_negatives / len(trained) if trained else math.nan,
            "specificity": (true_negatives + not_trained) / len(rows) if rows else math.nan}


def question_rows(rows: list[dict]) -> list[dict]:
    """One row per question (its first target's): the unit that time and memory were measured for."""
    first: dict[tuple[str, str, str], dict] = {}
    for row in rows:
        # The tag alone repeats (every explicit question of a case is "explicit"); with the text it is one question.
        first.setdefault((row["id"], row["tag"], row["question"]), row)
    return list(first.values())


def cost_summary(rows: list[dict]) -> dict:
    questions = question_rows(rows)
    seconds = np.array([row["seconds"] for row in questions], dtype=np.float64)
    memory = [row["peak_memory_mb"] for row in questions]
    if not seconds.size:
        return {"n": 0, "mean_s": math.nan, "median_s": math.nan, "p95_s": math.nan, "max_s": math.nan,
                "total_s": 0.0, "peak_mb": math.nan}
    return {"n": len(questions), "mean_s": float(seconds.mean()), "median_s": float(np.median(seconds)),
            "p95_s": float(np.percentile(seconds, 95)), "max_s": float(seconds.max()), "total_s": float(seconds.sum()),
            "peak_mb": float(max(memory))}


# ---- markdown -------------------------------------------------------------------------------------------------

def _percent(pair) -> str:
    mean, std = pair
    return "–" if math.isnan(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _mm(pair) -> str:
    mean, std = pair
    return "–" if math.isnan(mean) else f"{mean:.1f} ± {std:.1f}"


def _number(value, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(header: list[str], lines: list[list]) -> str:
    text = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    text += ["| " + " | ".join(str(cell) for cell in line) + " |" for line in lines]
    return "\n".join(text) + "\n"


SEGMENTATION_HEADER = ["", "N", "F1 / Dice (%)", "Pre (%)", "SE (%)", "IoU (%)", "HD95 (mm)", "HD95 median", "missed",
                       "not trained"]


def _segmentation_line(name: str, rows: list[dict]) -> list:
    s = segmentation_summary(rows)
    return [name, s["n"], _percent(s["dice"]), _percent(s["precision"]), _percent(s["sensitivity"]),
            _percent(s["iou"]), _mm(s["hd95_mm"]), _number(s["hd95_median"], 1), s["missed"], s["not_trained"]]


def segmentation_table(rows: list[dict], key: str | None) -> str:
    present = segmentation_rows(rows)
    groups = {**grouped(present, None), **(grouped(present, key) if key else {})}
    return markdown_table(SEGMENTATION_HEADER, [_segmentation_line(name, group) for name, group in groups.items()])


def presence_table(rows: list[dict]) -> str:
    """Table 3: false positives and specificity over absent-target questions, total and per dataset and kind."""
    absent = presence_rows(rows)
    lines = []
    for name, group in {"Total": absent, **grouped(absent, "dataset"), **grouped(absent, "kind")}.items():
        s = presence_summary(group)
        lines.append([name, s["n"], s["not_trained"], s["fp"], s["tn"], _number(100 * s["specificity_vision"]),
                      _number(100 * s["specificity"])])
    return markdown_table(["", "N", "not trained", "FP", "TN", "SPE by vision, trained targets (%)",
                           "SPE with the not-trained rule (%)"], lines)


def cost_table(rows: list[dict]) -> str:
    lines = []
    for name, group in {**grouped(rows, None), **grouped(rows, "kind")}.items():
        c = cost_summary(group)
        lines.append([name, c["n"], _number(c["mean_s"]), _number(c["median_s"]), _number(c["p95_s"]),
                      _number(c["max_s"]), _number(c["peak_mb"], 0)])
    return markdown_table(["", "questions", "mean s", "median s", "p95 s", "max s", "peak memory (MB)"], lines)


DEFINITIONS = """\
- Scores are computed per question and target on the CT's own grid. Dice = 2TP/(2TP+FP+FN) (= F1),
  Pre = TP/(TP+FP), SE = TP/(TP+FN), IoU = TP/(TP+FP+FN); a score whose denominator is 0 is 1 when both masks
  are empty and 0 otherwise. HD95: MONAI's symmetric 95th-percentile surface distance in mm; 0 when both masks
  are empty, inf when only one is.
- Segmentation tables: rows whose target is in the ground truth; mean ± standard deviation; HD95 over finite
  values, "missed" counts the rows with an empty prediction (HD95 inf).
- Presence (Table 3): absent-target questions; a non-empty prediction is a false positive; SPE = TN/(TN+FP)
  by vision alone over the targets the model was trained on ("not trained" rows left out), and over every row
  with the not-trained rule (the model declines a target it was not trained on: counted as a true negative).
- "not trained" (the answer's status not_trained) is counted apart everywhere: it is not a "missed" segment.
  "in region": the label annotates the target and the scan covers its body region; "out of region": the scan
  does not reach the target's body region.
- Cost: wall seconds per question (model call only) and peak memory (GPU: torch's peak allocation during the
  question; CPU: the process's peak resident memory so far).
"""


def _header(identity: dict, machines: list[dict]) -> str:
    settings = identity["settings"]
    lines = [
        f"- model: `{identity['model']}`, config.json sha256 `{identity['config_sha256']}`",
        f"- data list: `{identity['data']}`, sha256 `{identity['data_sha256']}`"
        + (f", split part `{identity['split']}`" if identity.get("split") else ""),
        f"- cases: {len(identity['cases'])}; started {identity['started']}, "
        f"report written {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- settings: profile {settings.get('profile', 'project')}, loops {settings['loops']}, "
        f"overlap {settings['overlap']}, sliding window "
        f"{'on' if settings['sliding_window'] else 'off (whole CT resized to one window)'}, kinds "
        f"{', '.join(settings['kinds'])}, at most {settings['max_questions_per_kind'] or 'all'} questions per kind",
    ]
    for machine in machines:
        lines.append(f"- machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
                     f"{machine['device']}")
    lines.append(f"- report written on {platform.node() or 'this machine'} ({platform.platform()})")
    return "\n".join(lines) + "\n"


def _images(plots: list[Path]) -> str:
    return "".join(f"![{path.stem}]({path.name})\n\n" for path in plots)


def left_out_text(left_out: dict[str, dict]) -> str:
    """What the scores do not cover, case by case: unnamed label values and the questions not asked because of them."""
    lines = []
    for case_id, record in left_out.items():
        values = record.get("unnamed_label_values") or {}
        if values:
            listed = ", ".join(f"{value} ({voxels} voxels)" for value, voxels in values.items())
            lines.append(f"- case `{case_id}`: label values {listed} have no name in `classes`: not scored")
        for kind in record.get("skipped_kinds") or ():
            lines.append(f"- case `{case_id}`: no {kind} questions: with unnamed label values, no body region is "
                         "known to lie outside the scan (name every value in `classes` to ask them)")
    return "\n".join(lines) + "\n" if lines else "Nothing: every label value is named in `classes`.\n"


def write_report(out: Path, rows: list[dict], identity: dict, machines: list[dict], plots: list[Path],
                 left_out: dict[str, dict] | None = None) -> Path:
    sections = [
        "# Evaluation report\n", _header(identity, machines),
        "\n## Left out\n\n", left_out_text(left_out or {}),
        "\n## Segmentation (Tables 1, 2, 4): overall and per dataset\n\n", segmentation_table(rows, "dataset"),
        "\n## Per question kind\n\n", segmentation_table(rows, "kind"),
        "\n## Per target\n\n", segmentation_table(rows, "target"),
        "\n## Target presence (Table 3)\n\n", presence_table(rows),
        "\n## Cost per question\n\n", cost_table(rows),
        "\n## Definitions\n\n", DEFINITIONS,
        "\n## Plots\n\n", _images(plots),
    ]
    return write_text_atomically(out / "report.md", "".join(sections))


# ---- two runs -------------------------------------------------------------------------------------------------

def _side_by_side(runs, table) -> str:
    """One table per run, headed by its name (the folder): simple, and each keeps its own N."""
    return "".join(f"**{name}**\n\n{table(rows)}\n" for name, _, rows in runs)


def _settings_table(runs) -> str:
    keys = ("model", "config_sha256", "data_sha256", "split")
    lines = [[key, *(str(identity.get(key, "")) for _, identity, _ in runs)] for key in keys]
    lines += [[key, *(str(identity["settings"][key]) for _, identity, _ in runs)] for key in runs[0][1]["settings"]]
    return markdown_table(["", *(name for name, _, _ in runs)], lines)


def _overall_comparison(runs) -> str:
    header = ["", *(f"{label} {name}" for label in ("F1", "Pre", "SE", "HD95") for name, _, _ in runs)]
    line = ["Overall"]
    summaries = [segmentation_summary(segmentation_rows(rows)) for _, _, rows in runs]
    for score, format_ in (("dice", _percent), ("precision", _percent), ("sensitivity", _percent), ("hd95_mm", _mm)):
        line += [format_(s[score]) for s in summaries]
    presence = [presence_summary(presence_rows(rows)) for _, _, rows in runs]
    costs = [cost_summary(rows) for _, _, rows in runs]
    extra = markdown_table(["", *(name for name, _, _ in runs)], [
        ["FP", *(p["fp"] for p in presence)], ["not trained", *(p["not_trained"] for p in presence)],
        ["SPE by vision (%)", *(_number(100 * p["specificity_vision"]) for p in presence)],
        ["SPE with the not-trained rule (%)", *(_number(100 * p["specificity"]) for p in presence)],
        ["mean s / question", *(_number(c["mean_s"]) for c in costs)],
        ["peak memory (MB)", *(_number(c["peak_mb"], 0) for c in costs)]])
    return markdown_table(header, [line]) + "\n" + extra


def write_comparison(out: Path, runs, plots: list[Path]) -> Path:
    sections = [
        f"# Comparison: {' vs '.join(name for name, _, _ in runs)}\n\n", _settings_table(runs),
        "\n## Overall\n\n", _overall_comparison(runs),
        "\n## Per dataset\n\n", _side_by_side(runs, lambda rows: segmentation_table(rows, "dataset")),
        "\n## Target presence (Table 3)\n\n", _side_by_side(runs, presence_table),
        "\n## Definitions\n\n", DEFINITIONS, "\n## Plots\n\n", _images(plots),
    ]
    return write_text_atomically(out / "compare.md", "".join(sections))
