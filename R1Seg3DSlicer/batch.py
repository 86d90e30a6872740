"""Ask R1Seg3D about one CT, or about a list of CTs, and save the answers as segmentation files.

Inside Slicer (same Logic code as the chat panel):
    Slicer --no-splash --no-main-window --ignore-slicerrc --python-script R1Seg3DSlicer/batch.py \\
        --input ct.nii.gz --question "segment the liver" --output liver.seg.nrrd
With plain Python and the PyPI `slicer-core` wheel (how it is tested):
    python R1Seg3DSlicer/batch.py --input ct.nii.gz --question "..." --output out.seg.nrrd

A list: `--list cases.txt` (one CT file or DICOM folder per line, relative to the list's folder; blank lines and
lines starting with # skipped: the list `r1seg batch --input` reads, with its reader) and one or more `--question`
(or `--questions-file`, one question per line), answered for every CT with one model load. Each answer goes to
`OUTPUT_DIR/<case>/q<N>.seg.nrrd` and `OUTPUT_DIR/results.csv` gets one row per (CT, question, target), the table of
`r1seg batch`; a CT or question that fails is an `error` row and the run goes on; running again skips what is done.

The answer text goes to stdout, progress to stderr, and `--answer-json` writes the answer, each
target's segment name, volume and voxel count, the timings and the device. The segmentation file is
written even when nothing was found (then it has no segments), so a pipeline always gets one.

With `--server URL` (and `--token-file F`), a running `r1seg serve` answers instead, so many batch
questions pay the model load once. A server on another machine must be https:// unless `--insecure`
is given; a server of another R1Seg3D API version is refused with both versions named.

Before any work it checks, as the module does before the first question, that Slicer, Python and the
installed packages are recent enough, and names the fix when they are not.

Exit codes: 0 answered; 1 unexpected error (traceback on stderr); 2 bad arguments; 3 input missing,
unreadable or unusable; 4 model folder or weights unusable; 5 inference failed; 6 output not written;
7 Slicer, Python or a Python package too old or missing.
"""

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_MODEL = 4
EXIT_INFERENCE = 5
EXIT_OUTPUT = 6
EXIT_DEPENDENCIES = 7


class BatchError(Exception):
    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def _make_lib_importable() -> None:
    """R1Seg3DSlicerLib sits next to this file in the source tree and one level up once installed
    (the extension installs batch.py in a subfolder so Slicer does not take it for a module)."""
    here = Path(__file__).resolve().parent
    for folder in (here, here.parent):
        if (folder / "R1Seg3DSlicerLib").is_dir():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            return


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        prog="batch.py", description="Ask R1Seg3D one question about a CT and save the answer as a segmentation."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="CT volume file (NIfTI, NRRD, ...) or DICOM series folder")
    source.add_argument("--list", type=Path,
                        help="text file listing CTs, one CT file or DICOM folder per line (relative to the file's folder)")
    parser.add_argument("--question", action="append",
                        help='question in plain language, e.g. "segment the liver"; with --list, repeat it for several')
    parser.add_argument("--questions-file", type=Path, help="with --list: a text file with one question per line")
    parser.add_argument("--output", type=Path, help="with --input: segmentation file to write (.seg.nrrd)")
    parser.add_argument("--output-dir", type=Path,
                        help="with --list: folder for <case>/q<N>.seg.nrrd and results.csv (an existing one is resumed)")
    parser.add_argument("--model", default=None,
                        help="model folder, or a name from `r1seg models` (default: the project's default model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu"], help="where the model runs")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="model precision: auto is bfloat16 on a GPU, float32 on a CPU; bfloat16 halves a CPU's memory use")
    parser.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the model's)")
    parser.add_argument("--loops", type=int, default=None, help="mask refinement loops 0-3 (default: the model's)")
    parser.add_argument("--answer-json", type=Path, default=None, help="also write the answer as JSON here")
    parser.add_argument("--server", default=None, metavar="URL",
                        help="ask a running `r1seg serve` instead of loading the model here (then --model, --device "
                             "and --dtype are the server's); many batch questions pay the model load once")
    parser.add_argument("--token-file", default=None, help="with --server: file holding the server's token")
    parser.add_argument("--insecure", action="store_true",
                        help="with --server: allow plain http:// to another machine (the CT and token cross the network "
                             "unencrypted; for a private, trusted network only)")
    arguments = parser.parse_args(argv)
    if arguments.input is not None:
        wrong = [(arguments.output is None, "--input needs --output"),
                 (len(arguments.question or ()) != 1 or arguments.questions_file is not None,
                  "--input takes exactly one --question (several questions, or --questions-file: use --list)"),
                 (arguments.output_dir is not None, "--output-dir goes with --list (--input writes --output)")]
    else:
        wrong = [(arguments.output_dir is None, "--list needs --output-dir"),
                 (arguments.output is not None, "--output goes with --input (--list writes into --output-dir)"),
                 (arguments.answer_json is not None, "--answer-json goes with --input (--list writes results.csv)")]
    problems = [message for failed, message in wrong if failed]
    if problems:
        parser.error("; ".join(problems))
    return arguments


def _scene_and_volumes_logic():
    """Slicer's own scene inside the application; a headless one under plain Python."""
    import slicer

    if getattr(slicer, "app", None) is not None:
        return slicer.mrmlScene, slicer.modules.volumes.logic(), None
    from R1Seg3DSlicerLib import scene

    headless = scene.create_headless_scene()
    # Returned so the caller keeps the logics alive for the whole run.
    return headless.scene, headless.volumes_logic, headless


def _load_volume(volumes_logic, path: Path):
    if not path.exists():
        raise BatchError(EXIT_INPUT, f"Input not found: {path}")
    if path.is_dir():
        # A DICOM series: any file of it is the archetype from which the reader finds the others.
        files = sorted(child for child in path.iterdir() if child.is_file())
        if not files:
            raise BatchError(EXIT_INPUT, f"Input folder is empty: {path}")
        archetype = files[0]
    else:
        archetype = path
    name = path.name.split(".")[0] or "CT"
    volume_node = volumes_logic.AddArchetypeVolume(str(archetype), name)
    if volume_node is None or volume_node.GetImageData() is None:
        raise BatchError(EXIT_INPUT, f"Could not read a volume from {path}")
    return volume_node


def _check_versions() -> None:
    """Refuse before any work when Slicer, Python or an installed package is too old (the module's own check,
    engine.version_problems), with each fix: Slicer's Python console inside Slicer, pip outside it."""
    import slicer
    from R1Seg3DSlicerLib import engine

    app = getattr(slicer, "app", None)
    problems = engine.version_problems((app.majorVersion, app.minorVersion) if app is not None else None,
                                       in_slicer=app is not None)
    if problems:
        raise BatchError(EXIT_DEPENDENCIES, "\n".join(problems))


def _engine_failure(error):
    """The BatchError for an error the engine explains to users; None for anything else (a bug,
    which gets its traceback)."""
    if isinstance(error, ModuleNotFoundError) and (error.name or "").startswith("r1seg_core"):
        return BatchError(
            EXIT_UNEXPECTED,
            f"The R1Seg3D engine is not importable ({error}). Install the project (pip install -e .)"
            " or run this script inside Slicer with the R1Seg3D extension.",
        )
    if isinstance(error, ModuleNotFoundError) and error.name:
        return BatchError(
            EXIT_DEPENDENCIES,
            f"The Python package {error.name!r} is missing. In Slicer, open the R1Seg3D module and ask one question:"
            " it offers to install what the engine needs. Outside Slicer: pip install -e . in the project folder.",
        )
    from r1seg_core import errors

    if isinstance(error, errors.InvalidInputError):
        return BatchError(EXIT_INPUT, str(error))
    if isinstance(error, errors.CheckpointError):
        return BatchError(EXIT_MODEL, str(error))
    if isinstance(error, errors.R1SegError):
        return BatchError(EXIT_INFERENCE, str(error))
    return None


class _ProgressPrinter:
    """One stderr line per stage and per tenth of the windows, not one per window."""

    def __init__(self, stream):
        self._stream = stream
        self._last = None

    def __call__(self, done, total, stage):
        tenth = int(10 * done / total) if total > 0 else None
        if (stage, tenth) != self._last:
            self._last = (stage, tenth)
            where = f" {done}/{total}" if total > 0 else ""
            print(f"[R1Seg3D] {stage}{where}", file=self._stream, flush=True)


def _save_segmentation(segmentation_node, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = segmentation_node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(segmentation_node):
        raise BatchError(EXIT_OUTPUT, f"Could not write the segmentation to {path}")


def _model_folder(model, server):
    """--model as `r1seg` reads it: a folder, or a model name from `r1seg models` that is installed. With --server
    the model is the server's: nothing is resolved here."""
    if model is None or server:
        return None
    from r1seg_core.registry import resolve_model

    return str(resolve_model(model))


def _asker(arguments, session, options, stderr):
    """A function (volume node, question) -> (result, change, found) that asks the model loaded here, or the server
    named by --server, and writes the answer's segments; engine errors come out as BatchError."""
    client = None
    if arguments.server:
        from r1seg_core.server.protocol import read_token
        from R1Seg3DSlicerLib import connection

        # The panel's client: https to other machines (or --insecure), the API header, the version check.
        client = connection.remote_client(arguments.server, read_token(arguments.token_file)
                                          if arguments.token_file else "", arguments.insecure)
        connection.check_health(client)

    def ask(volume_node, question):
        try:
            if client is not None:
                from R1Seg3DSlicerLib import server_client

                result = server_client.ask_blocking(client, session.volume_from_node(volume_node), question, options,
                                                    progress=_ProgressPrinter(stderr))
                return (result, *session.write_answer(volume_node, result))
            session.clear_conversation()   # each question on its own, as `r1seg batch` asks them
            return session.process(volume_node, question, options, progress=_ProgressPrinter(stderr))
        except Exception as error:
            _raise_as_batch_error(error)

    return ask


def _raise_as_batch_error(error: Exception):
    """Raise the BatchError of an error the engine explains to users; re-raise anything else (a bug: traceback)."""
    failure = _engine_failure(error)
    if failure is None:
        raise error
    raise failure from error


def run(arguments, predictor_factory=None, stdout=sys.stdout, stderr=sys.stderr) -> int:
    _make_lib_importable()
    _check_versions()
    from R1Seg3DSlicerLib import engine

    mrml_scene, volumes_logic, _keep_alive = _scene_and_volumes_logic()
    session = engine.R1SegSession(predictor_factory=predictor_factory)
    try:
        options = engine.AskOptions(
            model_dir=_model_folder(arguments.model, arguments.server),
            device="cuda" if arguments.device == "gpu" else arguments.device,
            dtype=arguments.dtype,
            overlap=arguments.overlap,
            loops=arguments.loops,
        )
        ask = _asker(arguments, session, options, stderr)
    except Exception as error:
        _raise_as_batch_error(error)
    if arguments.list is not None:
        return run_list(arguments, ask, mrml_scene, volumes_logic, stdout, stderr)
    return run_one(arguments, ask, mrml_scene, volumes_logic, stdout)


def run_one(arguments, ask, mrml_scene, volumes_logic, stdout) -> int:
    from R1Seg3DSlicerLib import scene

    question = arguments.question[0]
    volume_node = _load_volume(volumes_logic, arguments.input)
    started = time.monotonic()
    result, change, found = ask(volume_node, question)

    if change is None:
        # Nothing to write: still produce a (segment-less) segmentation on the CT's grid.
        change = scene.write_segments(volume_node, [])
    _save_segmentation(mrml_scene.GetNodeByID(change.segmentation_node_id), arguments.output)

    print(result.answer, file=stdout)
    for target in found:
        where = f"segment '{target.name}'" if target.in_scene else "empty mask, not written"
        print(f"  {target.name}: {target.volume_ml:.1f} mL ({target.voxel_count} voxels), {where}", file=stdout)
    for note in result.notes:
        print(f"  note: {note}", file=stdout)

    if arguments.answer_json is not None:
        summary = {
            "question": question,
            "input": str(arguments.input),
            "output": str(arguments.output),
            "answer": result.answer,
            "present": bool(result.present),
            "targets": [
                {
                    "name": target.name,
                    "segment_id": target.segment_id,
                    "volume_ml": target.volume_ml,
                    "voxel_count": target.voxel_count,
                }
                for target in found
            ],
            "timings": {key: float(value) for key, value in result.timings.items()},
            "notes": list(result.notes),
            "device": result.device,
            "wall_seconds": time.monotonic() - started,
        }
        try:
            arguments.answer_json.parent.mkdir(parents=True, exist_ok=True)
            arguments.answer_json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        except OSError as error:
            raise BatchError(EXIT_OUTPUT, f"Could not write {arguments.answer_json}: {error}") from error
    return EXIT_OK


def run_list(arguments, ask, mrml_scene, volumes_logic, stdout, stderr) -> int:
    """Every question about every CT of --list, into --output-dir: `r1seg batch`'s list reader, question reader and
    results table (resume included); one model load for the whole run."""
    from r1seg_core.batch import ERROR, ResultsTable, error_rows, find_cases, read_questions
    from r1seg_core.errors import InvalidInputError

    try:
        cases = find_cases(arguments.list)
        questions = read_questions(arguments.question, arguments.questions_file and str(arguments.questions_file))
    except InvalidInputError as error:
        raise BatchError(EXIT_INPUT, str(error)) from error
    out = arguments.output_dir
    out.mkdir(parents=True, exist_ok=True)
    table = ResultsTable(out)
    numbered = [(f"q{number}", question) for number, question in enumerate(questions, start=1)]
    errors = 0
    for case in cases:
        pending = [(question_id, question) for question_id, question in numbered if not table.done(case, question_id, out)]
        if not pending:
            print(f"[R1Seg3D] {case.case_id}: answered before, skipped", file=stderr)
            continue
        try:
            volume_node = _load_volume(volumes_logic, case.ct)
        except BatchError as error:
            volume_node, unreadable = None, error
        for question_id, question in pending:
            started = time.monotonic()
            base = dict(case=case.case_id, ct=str(case.ct), question_id=question_id, question=question)
            try:
                if volume_node is None:
                    raise unreadable
                rows = _answer_rows(ask, mrml_scene, volume_node, question, out, Path(case.case_id) / f"{question_id}.seg.nrrd",
                                    base, started)
            except BatchError as error:   # this answer fails, the run goes on
                errors += 1
                rows = error_rows(base, round(time.monotonic() - started, 2), error)
            table.replace(case, question_id, rows)
            print(f"[R1Seg3D] {case.case_id} {question_id}: " + ", ".join(
                f"{row['target']} {row['status']}" if row["status"] != ERROR else f"error: {row['error']}" for row in rows),
                file=stderr)
        if volume_node is not None:
            mrml_scene.RemoveNode(volume_node)
    print(f"wrote {table.path} ({table.row_count} rows; {errors} errors in this run)", file=stdout)
    return EXIT_OK


def _answer_rows(ask, mrml_scene, volume_node, question, out: Path, output: Path, base: dict, started: float) -> list:
    """Ask, save the answer's segments in their own file, and return its rows of results.csv (one per target)."""
    from R1Seg3DSlicerLib import scene

    result, change, found = ask(volume_node, question)
    if change is None:
        change = scene.write_segments(volume_node, [])
    segmentation_node = mrml_scene.GetNodeByID(change.segmentation_node_id)
    _save_segmentation(segmentation_node, out / output)
    mrml_scene.RemoveNode(segmentation_node)   # the next question of this CT writes a file of its own
    seconds = round(time.monotonic() - started, 2)
    from r1seg_core.batch import answer_rows

    return answer_rows(dict(base, seconds=seconds, output=str(output), answer=result.answer, error=""),
                       [(target.name, target.status, entry.volume_ml, entry.voxel_count)
                        for target, entry in zip(result.targets, found)])


def main(argv=None, predictor_factory=None, stdout=sys.stdout, stderr=sys.stderr) -> int:
    try:
        arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_request:  # argparse prints its own message
        return EXIT_OK if exit_request.code == 0 else EXIT_USAGE
    try:
        return run(arguments, predictor_factory, stdout, stderr)
    except BatchError as error:
        print(f"R1Seg3D: {error}", file=stderr)
        return error.exit_code
    except Exception:
        print("R1Seg3D: unexpected error:\n" + traceback.format_exc(), file=stderr)
        return EXIT_UNEXPECTED


def _exit(code: int) -> None:
    """`--python-script` alone does not end Slicer, so exit explicitly, with the code."""
    import slicer

    if getattr(slicer, "app", None) is not None:
        slicer.util.exit(code)
    else:
        sys.exit(code)


if __name__ == "__main__":
    _exit(main())
