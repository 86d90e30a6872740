"""`r1seg evaluate`: score a model on a data list, resumably and in shards, then write the report.

    REPORT_DIR/run.json                     what is being evaluated (model, config hash, data list hash, settings)
    REPORT_DIR/rows/shard-I-of-N.jsonl      one line per scored case: its rows, what it left out, the machine
    REPORT_DIR/masks/<id>__<target>__<tag>.nii.gz   with --save-masks, each prediction on the CT's grid
    REPORT_DIR/cases.csv, report.md, *.png  written once every case is scored (by the last shard, or --merge)

A case's line is appended, flushed and synced only when all its questions are answered, so a killed run loses at
most the case it was on: the next run skips every case any shard has already scored, and drops a half-written
line. Shard I of N (0 <= I < N) scores cases I, I + N, I + 2N, ... of the list.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError
from ..model.packaged import file_sha256
from ..volume import Volume, write_labelmap
from .cases import DataList, EvalCase, load_case, read_data_list
from .metrics import score_masks
from .questions import KINDS, Question, build_questions
from .report import NOT_NAMED, PRESENT, read_rows, write_comparison, write_report, write_rows

RUN_FILE = "run.json"
ROWS_DIR = "rows"
MASKS_DIR = "masks"
CASES_CSV = "cases.csv"


@dataclass
class EvaluationSettings:
    data: Path
    out: Path
    model: Path | None = None               # None: the bundled default model
    split: str = "test"
    loops: int | None = None                # None: the checkpoint's
    overlap: float | None = None            # None: the profile's (0.25 project, 0.5 original)
    profile: str = "auto"                   # the predictor's inference profile
    sliding_window: bool = True
    kinds: tuple[str, ...] = KINDS
    max_questions_per_kind: int | None = None
    targets: tuple[str, ...] | None = None  # only these structures are asked about (out-of-region ones excepted)
    device: str = "auto"
    dtype: str = "auto"
    window_batch: int | None = None
    save_masks: bool = False
    shard: tuple[int, int] = (0, 1)
    max_cases: int | None = None            # stop after scoring this many cases (a job's time budget)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise InvalidInputError(f"--shard takes I/N (e.g. 0/4), got {text!r}") from None
    if not (count >= 1 and 0 <= index < count):
        raise InvalidInputError(f"--shard {text}: I must be in 0 … N-1 and N at least 1")
    return index, count


def evaluate(settings: EvaluationSettings, progress: bool = True) -> Path | None:
    """Score this shard's remaining cases; returns the report folder once every case is scored, else None."""
    from .. import default_model_path
    from ..inference import Predictor

    unknown = set(settings.kinds) - set(KINDS)
    if unknown:
        raise InvalidInputError(f"unknown question kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    data = read_data_list(settings.data, settings.split)      # every case checked before anything is written
    model_dir = Path(settings.model or default_model_path()).resolve()
    predictor = Predictor(model_dir, device=settings.device, dtype=settings.dtype, profile=settings.profile)
    out = Path(settings.out)
    _claim(out, _identity(settings, data, model_dir, predictor))
    done = scored_cases(out)
    index, count = settings.shard
    rows_file = out / ROWS_DIR / f"shard-{index}-of-{count}.jsonl"
    _drop_partial_line(rows_file)
    todo = [case for case in data.cases[index::count] if case.case_id not in done]
    machine = _machine(predictor)
    for scored, case in enumerate(_progress(todo, len(data.cases[index::count]), progress), start=1):
        rows, left_out = score_case(predictor, case, settings, out)
        _append_line(rows_file, {"id": case.case_id, "rows": rows, "left_out": left_out, "machine": machine,
                                 "scored_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        if settings.max_cases is not None and scored >= settings.max_cases:
            break
    if set(scored_cases(out)) >= {case.case_id for case in data.cases}:
        return merge(out)
    return None


def _progress(cases: list[EvalCase], total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(cases, total=total, initial=total - len(cases), desc="cases", unit="case", file=sys.stderr,
                disable=not enabled)


# ---- one case -------------------------------------------------------------------------------------------------

def score_case(predictor, case: EvalCase, settings: EvaluationSettings, out: Path) -> tuple[list[dict], dict]:
    """The case's rows, and what it left out: label values its `classes` do not name (value -> voxels), and then
    the out-of-region absent questions (nothing is known to lie outside the scan)."""
    image, truth, unnamed = load_case(case)
    present = [name for name in case.annotated if truth[name].any()]
    questions = build_questions(case, present, settings.kinds, settings.max_questions_per_kind, settings.targets,
                                unnamed_foreground=bool(unnamed))
    skipped = ["absent_out_of_region"] if unnamed and "absent_out_of_region" in settings.kinds else []
    left_out = {"unnamed_label_values": {str(v): n for v, n in unnamed.items()}, "skipped_kinds": skipped}
    rows = []
    try:
        for question in questions:
            result, seconds, peak_mb = _timed_answer(predictor, image, question.text, settings)
            for target in question.targets:
                prediction = predicted_mask(result, target, image.shape, single=len(question.targets) == 1)
                reference = truth.get(target, np.zeros(image.shape, dtype=bool))
                row = _row(case, question, target, result, prediction, reference, image, seconds, peak_mb)
                if settings.save_masks:
                    row["mask"] = _save_mask(out, case, question, target, prediction, image)
                rows.append(row)
    finally:
        predictor.clear_cache()         # the next case is another CT: free this one's windows
    return rows, left_out


def _timed_answer(predictor, image: Volume, question: str, settings: EvaluationSettings):
    import torch

    cuda = predictor.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(predictor.device)
    start = time.perf_counter()
    result = predictor.ask(image, question, overlap=settings.overlap, loops=settings.loops,
                           window_batch=settings.window_batch, sliding_window=settings.sliding_window)
    seconds = time.perf_counter() - start
    return result, seconds, peak_memory_mb(predictor.device)


def peak_memory_mb(device) -> float:
    """GPU: the peak allocated by torch since the last reset (one question). CPU: the process's peak RSS so far."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10   # bytes on macOS, KiB on Linux


def predicted_mask(result, target: str, shape, single: bool) -> np.ndarray:
    """The model's mask for `target`: the answer's target of that name; for a one-target question whose answer
    names other targets (an implicit question answered with another structure), the union of its masks."""
    named = [t.mask > 0 for t in result.targets if t.name == target]
    if named:
        return named[0]
    if single and result.targets:
        return np.logical_or.reduce([t.mask > 0 for t in result.targets])
    return np.zeros(shape, dtype=bool)


def predicted_status(result, target: str, single: bool) -> str:
    """The decision behind `predicted_mask`: the named target's status (present, absent, not_trained), "present"
    when a one-target question was answered with another structure, else "not_named" (the answer never named it)."""
    named = [t.status for t in result.targets if t.name == target]
    if named:
        return named[0]
    if single and any(t.present for t in result.targets):
        return PRESENT
    return NOT_NAMED


def _row(case, question: Question, target, result, prediction, reference, image, seconds, peak_mb) -> dict:
    return {"id": case.case_id, "dataset": case.dataset, "target": target, "kind": question.kind,
            "tag": question.tag, "question": question.text, "answer": result.answer,
            "predicted_targets": ";".join(t.name for t in result.targets if t.present),
            "status": predicted_status(result, target, single=len(question.targets) == 1),
            **score_masks(prediction, reference, image.spacing),
            "present_gt": bool(reference.any()), "present_pred": bool(prediction.any()),
            "gt_voxels": int(np.count_nonzero(reference)), "pred_voxels": int(np.count_nonzero(prediction)),
            "seconds": round(seconds, 4), "peak_memory_mb": round(peak_mb, 1), "mask": ""}


def _file_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def _save_mask(out: Path, case, question: Question, target: str, prediction, image: Volume) -> str:
    relative = Path(MASKS_DIR) / f"{_file_safe(case.case_id)}__{_file_safe(target)}__{question.tag}.nii.gz"
    (out / MASKS_DIR).mkdir(exist_ok=True)
    write_labelmap(out / relative, prediction.astype(np.uint8), image, {1: target})
    return str(relative)


# ---- the run's identity, rows and merge ---------------------------------------------------------------------

def _identity(settings: EvaluationSettings, data: DataList, model_dir: Path, predictor) -> dict:
    """What a resumed run or another shard must share with this one for their rows to belong in one report."""
    config = model_dir / "config.json"
    return {"model": str(model_dir), "config_sha256": file_sha256(config) if config.is_file() else "",
            "data": str(data.path), "data_sha256": data.sha256, "split": data.split,
            "cases": [case.case_id for case in data.cases],
            "settings": {"loops": settings.loops if settings.loops is not None else predictor.model.config.refine_loops,
                         "overlap": predictor.profile.overlap if settings.overlap is None else settings.overlap,
                         "profile": predictor.profile.name, "sliding_window": settings.sliding_window,
                         "kinds": list(settings.kinds), "max_questions_per_kind": settings.max_questions_per_kind}}


def _claim(out: Path, identity: dict) -> None:
    """Start a run in `out`, or join the one there (resume, another shard) when it evaluates the same thing."""
    path = out / RUN_FILE
    if path.is_file():
        existing = json.loads(path.read_text())
        differing = [key for key in identity if existing.get(key) != identity[key]]
        if differing:
            raise InvalidInputError(f"{out} holds a run of another evaluation (its {', '.join(differing)} differ); "
                                    "use another --out folder, or delete that one to start again")
        return
    (out / ROWS_DIR).mkdir(parents=True, exist_ok=True)
    record = {**identity, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    temporary = out / f".{RUN_FILE}.{os.getpid()}.partial"
    temporary.write_text(json.dumps(record, indent=1))
    try:
        # A hard link appears whole and fails when the name exists: of several shards starting at once, one
        # writes run.json and the others check themselves against it.
        os.link(temporary, path)
    except FileExistsError:
        _claim(out, identity)
    finally:
        temporary.unlink()


def _drop_partial_line(path: Path) -> None:
    """A run killed while writing leaves a line without its newline: cut it, so the case is scored again."""
    if not path.is_file():
        return
    content = path.read_bytes()
    if content and not content.endswith(b"\n"):
        with open(path, "r+b") as stream:
            stream.truncate(content.rfind(b"\n") + 1)


def _append_line(path: Path, record: dict) -> None:
    with open(path, "a") as stream:
        stream.write(json.dumps(record) + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def scored_cases(out: Path) -> dict[str, dict]:
    """Case id -> its line, from every shard's rows file; a half-written last line does not count."""
    scored: dict[str, dict] = {}
    for path in sorted((out / ROWS_DIR).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            scored.setdefault(record["id"], record)
    return scored


def _machine(predictor) -> dict:
    import torch

    device = predictor.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "device": f"{device.type}: {name}"}


def merge(out) -> Path:
    """Write cases.csv, report.md and the plots from every shard's rows; refuses while cases are missing."""
    from .plots import plot_run

    out = Path(out)
    if not (out / RUN_FILE).is_file():
        raise InvalidInputError(f"{out} is not an evaluation folder (no {RUN_FILE})")
    identity = json.loads((out / RUN_FILE).read_text())
    scored = scored_cases(out)
    missing = [case_id for case_id in identity["cases"] if case_id not in scored]
    if missing:
        raise InvalidInputError(f"{out}: {len(missing)} of {len(identity['cases'])} cases are not scored yet "
                                f"({', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}); run the remaining "
                                "shards (or the same command again) first")
    rows = [row for case_id in identity["cases"] for row in scored[case_id]["rows"]]
    machines = list({json.dumps(scored[c]["machine"], sort_keys=True): scored[c]["machine"] for c in scored}.values())
    write_rows(out / CASES_CSV, rows)
    # The report is made from cases.csv as written, as --compare reads it.
    rows = read_rows(out / CASES_CSV)
    left_out = {case_id: scored[case_id].get("left_out") or {} for case_id in identity["cases"]}
    write_report(out, rows, identity, machines, plot_run(out, rows), left_out)
    return out


def compare(first, second, out) -> Path:
    """Two finished reports side by side: tables (compare.md) and plots in `out`."""
    from .plots import plot_comparison

    runs = []
    for folder in (Path(first), Path(second)):
        if not (folder / CASES_CSV).is_file() or not (folder / RUN_FILE).is_file():
            raise InvalidInputError(f"{folder} is not a finished evaluation (no {CASES_CSV} or {RUN_FILE}); "
                                    "merge it first")
        runs.append((folder.name, json.loads((folder / RUN_FILE).read_text()), read_rows(folder / CASES_CSV)))
    if runs[0][0] == runs[1][0]:
        runs = [(str(Path(first)), *runs[0][1:]), (str(Path(second)), *runs[1][1:])]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_comparison(out, runs, plot_comparison(out, runs))
    return out
