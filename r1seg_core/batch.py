"""`r1seg batch`: many CTs times many questions with one model load, a results table, and resume.

Each (CT, question) writes `OUT/<case>/<question id>.<format>` (every target of the answer as a named segment) and
adds one row per target to `OUT/results.csv`: status, volume, voxels, seconds, the answer text. A CT that cannot be
read, or a question that fails, gives an `error` row and the run goes on. The table is rewritten atomically after
each answer, so a stopped run loses at most the answer in progress; the next run with the same OUT skips every
(CT, question) that has rows and its file, and retries the error rows.
"""
from __future__ import annotations

import csv
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInputError, R1SegError
from .files import write_text_atomically

RESULTS_NAME = "results.csv"
COLUMNS = ("case", "ct", "question_id", "question", "target", "status", "volume_ml", "voxel_count", "seconds",
           "output", "answer", "error")
FORMATS = ("seg.nrrd", "nii.gz", "nrrd")
ERROR = "error"


@dataclass(frozen=True)
class Case:
    case_id: str
    ct: Path


def find_cases(source: Path) -> list[Case]:
    """A folder: its CT files and its sub-folders (each a DICOM series). A text file: one CT path or DICOM folder
    per line, relative to the file's folder; blank lines and lines starting with # are skipped."""
    from .volume import _VOLUME_SUFFIXES as CT_SUFFIXES, _volume_name

    if source.is_dir():
        paths = sorted(p for p in source.iterdir()
                       if (p.is_file() and p.name.lower().endswith(CT_SUFFIXES)) or (p.is_dir() and not p.name.startswith(".")))
    elif source.is_file():
        lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
        paths = [(source.parent / line) for line in lines if line and not line.startswith("#")]
    else:
        raise InvalidInputError(f"--input {source}: no such file or folder")
    if not paths:
        raise InvalidInputError(f"--input {source}: no CT found (CT files {', '.join(CT_SUFFIXES)} or DICOM folders)")
    cases, seen = [], {}
    for path in paths:
        case_id = _volume_name(path)   # the file name without its image suffix
        if case_id in seen:
            raise InvalidInputError(f"--input: {seen[case_id]} and {path} would both be case {case_id!r}; rename one")
        seen[case_id] = path
        cases.append(Case(case_id, path))
    return cases


def read_questions(questions: list[str] | None, questions_file: str | None) -> list[str]:
    found = list(questions or [])
    if questions_file:
        path = Path(questions_file)
        if not path.is_file():
            raise InvalidInputError(f"--questions-file {path}: no such file")
        found += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                  if line.strip() and not line.strip().startswith("#")]
    if not found:
        raise InvalidInputError("r1seg batch needs at least one --question or a --questions-file")
    return found


class ResultsTable:
    """results.csv: read on start (resume), rewritten whole and atomically after each answer."""

    def __init__(self, out: Path):
        self.path = out / RESULTS_NAME
        # The rows of each (case, question id), in the order they were answered: one lookup per pair, not a scan.
        self.answers: dict[tuple[str, str], list[dict]] = {}
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as stream:
                reader = csv.DictReader(stream)
                if tuple(reader.fieldnames or ()) != COLUMNS:
                    raise InvalidInputError(f"{self.path} is not a results table of r1seg batch (columns "
                                            f"{reader.fieldnames}); choose another --out")
                for row in reader:
                    self.answers.setdefault((row["case"], row["question_id"]), []).append(row)

    @property
    def row_count(self) -> int:
        return sum(len(rows) for rows in self.answers.values())

    def done(self, case: Case, question_id: str, out: Path) -> bool:
        rows = self.answers.get((case.case_id, question_id), [])
        return bool(rows) and all(r["status"] != ERROR and (out / r["output"]).is_file() for r in rows)

    def replace(self, case: Case, question_id: str, rows: list[dict]) -> None:
        self.answers.pop((case.case_id, question_id), None)    # a retried answer moves to the end, as it ran last
        self.answers[(case.case_id, question_id)] = rows
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=COLUMNS)
        writer.writeheader()
        for rows_of_answer in self.answers.values():
            writer.writerows(rows_of_answer)
        write_text_atomically(self.path, table.getvalue())


def run_batch(args) -> int:
    from .answer_output import quiet_libraries
    from .cli import load_predictor
    from .volume import read_volume

    quiet_libraries()
    out = Path(args.out)
    cases = find_cases(Path(args.input))
    questions = read_questions(args.question, args.questions_file)
    out.mkdir(parents=True, exist_ok=True)
    table = ResultsTable(out)
    pairs = [(case, f"q{index}", question) for case in cases for index, question in enumerate(questions, start=1)]
    todo = [pair for pair in pairs if not table.done(pair[0], pair[1], out)]
    print(f"{len(cases)} CTs x {len(questions)} questions: {len(pairs) - len(todo)} done before, {len(todo)} to answer",
          file=sys.stderr)
    predictor, volume, volume_case, volume_error, errors = None, None, None, None, 0
    for number, (case, question_id, question) in enumerate(todo, start=1):
        start = time.perf_counter()
        base = dict(case=case.case_id, ct=str(case.ct), question_id=question_id, question=question)
        try:
            if volume_case != case:   # cases come in order: each CT is read once, for all its questions
                volume_case, volume, volume_error = case, None, None
                try:
                    volume = read_volume(case.ct)
                except R1SegError as error:
                    volume_error = error
            if volume_error is not None:
                raise volume_error
            predictor = predictor or load_predictor(args)
            result = predictor.ask(volume, question, overlap=args.overlap, loops=args.loops,
                                   window_batch=args.window_batch, sliding_window=not args.no_sliding_window)
            output = Path(case.case_id) / f"{question_id}.{args.format}"
            (out / output).parent.mkdir(parents=True, exist_ok=True)
            from .answer_output import segment_colors

            result.write(out / output, volume, segment_colors(result))
            seconds = round(time.perf_counter() - start, 2)
            rows = answer_rows(dict(base, seconds=seconds, output=str(output), answer=result.answer, error=""),
                               [(t.name, t.status, t.volume_ml, t.voxel_count) for t in result.targets])
            line = ", ".join(f"{t.name} {t.status} {t.volume_ml:.1f} mL" for t in result.targets) or result.answer
        except (R1SegError, RuntimeError, ValueError, OSError) as error:   # this answer fails, the run goes on
            errors += 1
            seconds = round(time.perf_counter() - start, 2)
            rows = error_rows(base, seconds, error)
            line = f"error: {error}"
        table.replace(case, question_id, rows)
        print(f"[{number}/{len(todo)}] {case.case_id} {question_id}: {line} ({seconds:.1f} s)", file=sys.stderr)
    print(f"wrote {table.path} ({table.row_count} rows; {errors} errors in this run)")
    return 0


def answer_rows(answered: dict, targets: list[tuple[str, str, float, int]]) -> list[dict]:
    """The rows of one answer, from its (name, status, volume in mL, voxels) per target. A question that named
    nothing the model could segment still gets one row, so that a resumed run counts it as answered."""
    from .inference.result import NOT_UNDERSTOOD

    if not targets:
        return [dict(answered, target="", status=NOT_UNDERSTOOD, volume_ml="", voxel_count=0)]
    return [dict(answered, target=name, status=status, volume_ml=round(volume_ml, 3), voxel_count=voxels)
            for name, status, volume_ml, voxels in targets]


def error_rows(base: dict, seconds: float, error: BaseException) -> list[dict]:
    """The one row of an answer that failed: the run goes on, and the next run retries it."""
    return [dict(base, target="", status=ERROR, volume_ml="", voxel_count="", seconds=seconds, output="", answer="",
                 error=str(error))]


# The model and window options of `r1seg ask`: the same argparse actions, so the two never drift apart.
SHARES_ASK_OPTIONS = ("model", "device", "dtype", "profile", "overlap", "loops", "window_batch", "no_sliding_window")


def register(subparsers, ask) -> None:
    batch = subparsers.add_parser(
        "batch", help="answer questions about many CTs: one model load, results.csv, resumable",
        description="Ask every question about every CT with one model load. Writes OUT/<case>/<question id>.<format> "
                    "and OUT/results.csv (one row per CT, question and target). Run it again with the same --out to "
                    "continue: answered questions are skipped, error rows retried.")
    batch.add_argument("--input", required=True,
                       help="a folder of CTs (files, or sub-folders holding a DICOM series), or a text file listing "
                            "one CT or DICOM folder per line")
    batch.add_argument("--question", action="append", help="a question (repeat for several)")
    batch.add_argument("--questions-file", help="a text file with one question per line")
    batch.add_argument("--out", required=True, help="output folder (an existing one is resumed)")
    batch.add_argument("--format", choices=FORMATS, default="seg.nrrd", help="mask file format (default seg.nrrd)")
    for action in ask._actions:
        if action.dest in SHARES_ASK_OPTIONS:
            batch._add_action(action)
    batch.set_defaults(handler=run_batch)
