"""`r1seg models` (list the known models) and `r1seg models get NAME` (download, check and convert one)."""
from __future__ import annotations

import contextlib
import json
import sys
import time

from ..errors import R1SegError
from .catalogue import entry_named, load_registry, read_record, registry_path

# --progress-json writes at most one progress line per this many seconds (and always the last one).
PROGRESS_INTERVAL_S = 0.25


def register(subparsers) -> None:
    models = subparsers.add_parser(
        "models", help="list the known models, or download one (`r1seg models get NAME`)",
        description="Without arguments: every model this project knows, with its source, revision, download size, "
                    "memory, licence and whether it is installed. `get NAME` downloads it from Hugging Face "
                    "(HF_ENDPOINT, HF_HUB_OFFLINE and proxy variables honoured), checks every file's SHA-256 and "
                    "converts it into a model folder under $R1SEG_CACHE (default ~/.cache/r1seg3d)/models; then "
                    "`--model NAME` uses it, offline.")
    models.add_argument("--json", action="store_true",
                        help="for programs (the Slicer panel's model picker): the list as one JSON object, each model "
                             "with its name, title, answers, bundled, installed, folder, download, memory, licence, note")
    actions = models.add_subparsers(dest="models_action")
    get = actions.add_parser("get", help="download, check and convert a model (resumes an interrupted download)")
    get.add_argument("name")
    get.add_argument("--keep-download", action="store_true",
                     help="keep the downloaded original files (in $R1SEG_CACHE/downloads/NAME) after converting")
    get.add_argument("--progress-json", action="store_true",
                     help="for programs (the Slicer panel): stdout carries only JSON lines, one object each: "
                          '{"event": "progress", "done": BYTES, "total": BYTES, "file": NAME}, then '
                          '{"event": "installed", "folder": PATH} or {"event": "error", "message": TEXT} (the message '
                          "`error:` prints; the exit code is the same); the rest of the output goes to stderr")
    models.set_defaults(handler=run_models)


def run_models(args) -> int:
    if args.models_action == "get":
        from .download import install

        if not args.progress_json:
            install(entry_named(args.name), keep_download=args.keep_download)
            return 0
        emit = JsonEvents(sys.stdout)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                folder = install(entry_named(args.name), keep_download=args.keep_download,
                                 log=lambda text: print(text, file=sys.stderr), progress=emit.progress)
        except R1SegError as error:
            emit({"event": "error", "message": str(error)})
            raise
        emit({"event": "installed", "folder": str(folder)})
        return 0
    print(json.dumps(models_json()) if args.json else models_table())
    return 0


def models_json() -> dict:
    return {"registry": str(registry_path()),
            "models": [{"name": e.name, "title": e.title, "answers": e.answers, "bundled": e.bundled,
                        "installed": e.installed, "folder": str(e.folder), "download": e.download, "memory": e.memory,
                        "licence": e.licence, "note": e.note} for e in load_registry().values()]}


def models_table() -> str:
    lines = [f"models known to r1seg ({registry_path()}):"]
    for entry in load_registry().values():
        record = read_record(entry) if not entry.bundled else None
        state = ("installed (bundled)" if entry.bundled else f"installed: {entry.folder}" if entry.installed
                 else f"not installed: r1seg models get {entry.name}")
        lines += ["", f"{entry.name}  [{state}]", f"  {entry.title}"]
        for source in entry.sources:
            commit = next((s["commit"] for s in (record or {}).get("sources", ()) if s["role"] == source.role), None)
            pin = (f"revision {source.revision} (pinned)" if source.revision else
                   f"revision {commit} (recorded at download)" if commit else
                   "revision not pinned: the current commit of main, recorded at download")
            lines.append(f"  source ({source.role}): huggingface.co/{source.repo}, {pin}")
        lines += [f"  download: {entry.download}", f"  memory: {entry.memory}", f"  licence: {entry.licence}"]
        if entry.note:
            lines.append(f"  note: {entry.note}")
    return "\n".join(lines)


class JsonEvents:
    """`--progress-json`'s output: one JSON object per line, flushed; progress lines at most every
    PROGRESS_INTERVAL_S, except the one that completes the download."""

    def __init__(self, stream):
        self.stream = stream
        self.last_progress = -PROGRESS_INTERVAL_S

    def __call__(self, event: dict) -> None:
        self.stream.write(json.dumps(event) + "\n")
        self.stream.flush()

    def progress(self, done: int, total: int, file: str) -> None:
        now = time.monotonic()
        if done >= total or now - self.last_progress >= PROGRESS_INTERVAL_S:
            self.last_progress = now
            self({"event": "progress", "done": done, "total": total, "file": file})
