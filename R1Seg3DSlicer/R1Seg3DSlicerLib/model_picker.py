"""The panel's model picker: the registry's models that answer questions, what each needs, and its download.

The list is the engine's registry as `r1seg models --json` gives it (`models_json`, read in Slicer's process: it
needs neither torch nor the network), so the panel and the command line always agree on names, folders, sizes and
licences. The download runs OUT of Slicer's process, with the engine's Python (the one the server runs with), so
that it cannot block or crash Slicer: `r1seg models get NAME --progress-json` writes its JSON lines to a file the
panel reads from a timer (no thread: Slicer's main thread starves Python threads, issue #13). Cancel ends the whole
process tree (process_tree.py); the bytes already downloaded stay, and the next Download resumes them. Every
failure is the command's own one-line message. No Qt here.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import process_tree
from .i18n import tr as _

# How the registry says that the authors state no licence (models.json's `licence` starts with it).
NO_LICENCE_MARK = "none stated"
CUSTOM_FOLDER = "custom"   # the picker's item for a folder chosen in Advanced > Model folder


@dataclass(frozen=True)
class ModelChoice:
    name: str
    title: str
    installed: bool
    folder: str              # where the model lives once installed (the bundled one: inside the engine)
    bundled: bool
    download: str            # the registry's size text, e.g. "about 8 GB (bfloat16) ..."
    memory: str
    licence: str             # verbatim from the registry
    note: str = ""

    @property
    def licence_stated(self) -> bool:
        return not self.licence.lower().startswith(NO_LICENCE_MARK)

    @property
    def folder_setting(self) -> str | None:
        """What the model-folder setting becomes when this model is picked: "" for the bundled default (the
        engine's default model), the folder for an installed one, None when it is not installed (nothing changes)."""
        if not self.installed:
            return None
        return "" if self.bundled else self.folder


class ModelListError(RuntimeError):
    """The engine could not list its models; the message says why."""


def engine_command(arguments: list[str], python: str | None = None, environment: dict | None = None):
    """(command line, environment) that run `r1seg ARGUMENTS` with the engine's Python and the engine this module
    uses first on its path (server_process: the same as the server's)."""
    from .server_process import engine_search_path, slicer_python

    return ([python or slicer_python(), "-m", "r1seg_core.cli", *arguments],
            engine_search_path(dict(environment or os.environ)))


def command_message(output: str) -> str:
    """What an r1seg command that failed said: its one `error:` line, else (it crashed) the end of its output."""
    errors = [line[len("error: "):] for line in output.splitlines() if line.startswith("error: ")]
    return errors[-1] if errors else "\n".join(output.strip().splitlines()[-4:])


def model_choices() -> list[ModelChoice]:
    """The registry's models that answer questions, in its order, with their installed state now (read in
    Slicer's process: the registry needs neither torch nor the network, and takes milliseconds)."""
    try:
        from r1seg_core.errors import R1SegError
        from r1seg_core.registry.command import models_json
    except ImportError as error:
        raise ModelListError(_("The R1Seg3D engine could not list its models: {error}").format(error=error)) from error
    try:
        listing = models_json()
    except (R1SegError, OSError, ValueError) as error:
        raise ModelListError(_("The R1Seg3D engine could not list its models: {error}").format(error=error)) from error
    return [ModelChoice(item["name"], item["title"], bool(item["installed"]), item["folder"], bool(item["bundled"]),
                        item["download"], item["memory"], item["licence"], item.get("note", ""))
            for item in listing["models"] if item["answers"]]


def choice_for_folder(choices: list[ModelChoice], model_folder: str) -> str:
    """The picker's item for the model-folder setting: the model installed there, else CUSTOM_FOLDER."""
    if not model_folder:
        return next((choice.name for choice in choices if choice.bundled), CUSTOM_FOLDER)
    wanted = Path(model_folder).expanduser().resolve()
    return next((choice.name for choice in choices
                 if choice.installed and not choice.bundled and Path(choice.folder).resolve() == wanted), CUSTOM_FOLDER)


def details_text(choice: ModelChoice) -> str:
    """What the panel shows under the picker: state, download size, memory, the licence note verbatim."""
    state = (_("installed (ships with R1Seg3D)") if choice.bundled else
             _("installed in {folder}").format(folder=choice.folder) if choice.installed else
             _("not installed: Download fetches it"))
    lines = [choice.title, _("State: {state}").format(state=state),
             _("Download: {size}").format(size=choice.download), _("Memory: {memory}").format(memory=choice.memory),
             _("Licence: {licence}").format(licence=choice.licence)]
    if not choice.licence_stated:
        lines.append(_("The authors state no licence for these weights."))
    if choice.note:
        lines.append(_("Note: {note}").format(note=choice.note))
    return "\n".join(lines)


def consent_text(choice: ModelChoice) -> str:
    """The one question asked before a download: its size, the memory it needs and its licence note."""
    lines = [_("Download {title}?").format(title=choice.title), "",
             _("Size: {size}").format(size=choice.download), _("Memory to run it: {memory}").format(memory=choice.memory),
             _("Licence: {licence}").format(licence=choice.licence)]
    if not choice.licence_stated:
        lines.append(_("The authors state no licence: by downloading you take responsibility for how the weights are"
                       " used; do not redistribute them without asking the authors."))
    lines += ["", _("It is downloaded from Hugging Face (or HF_ENDPOINT), checked file by file and converted into"
                    " {folder}. An interrupted download resumes.").format(folder=choice.folder)]
    return "\n".join(lines)


# ---- the download's events, as the panel's timer receives them ---------------------------------------------------

@dataclass(frozen=True)
class DownloadProgress:
    done: int
    total: int
    file: str

    @property
    def fraction(self) -> float | None:
        return min(self.done / self.total, 1.0) if self.total > 0 else None

    def text(self) -> str:
        return _("Downloading {file}: {done:.1f} of {total:.1f} MB").format(
            file=self.file, done=self.done / 1e6, total=self.total / 1e6)


@dataclass(frozen=True)
class DownloadFinished:
    folder: str


@dataclass(frozen=True)
class DownloadFailed:
    message: str


@dataclass(frozen=True)
class DownloadCancelled:
    message: str


def parse_event(line: str):
    """One `--progress-json` line as an event; None for anything else."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    kind = event.get("event") if isinstance(event, dict) else None
    if kind == "progress":
        return DownloadProgress(int(event["done"]), int(event["total"]), str(event["file"]))
    if kind == "installed":
        return DownloadFinished(str(event["folder"]))
    if kind == "error":
        return DownloadFailed(str(event["message"]))
    return None


class ModelDownload:
    """`r1seg models get NAME --progress-json` in a process of its own; `poll()` from a timer returns new events,
    and a last one (finished, failed or cancelled) when the process has ended."""

    def __init__(self, name: str, python: str | None = None, environment: dict | None = None):
        self.name = name
        self._python = python
        self._environment = environment
        self._process: subprocess.Popen | None = None
        self._events_path: Path | None = None
        self._log_path: Path | None = None
        self._read = 0
        self._partial = ""
        self._cancelled = False
        self._verdict = False    # the command said how it ended (installed, or its error)
        self.ended = False

    def start(self) -> None:
        command, environment = engine_command(["models", "get", self.name, "--progress-json"], self._python,
                                              self._environment)
        handle, events_path = tempfile.mkstemp(prefix="r1seg-download-", suffix=".jsonl")
        log_handle, log_path = tempfile.mkstemp(prefix="r1seg-download-", suffix=".log")
        self._events_path, self._log_path = Path(events_path), Path(log_path)
        with os.fdopen(handle, "wb") as events, os.fdopen(log_handle, "wb") as log:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=events, stderr=log,
                                             env=environment, **process_tree.popen_options())

    @property
    def running(self) -> bool:
        return self._process is not None and not self.ended

    def poll(self) -> list:
        if self._process is None or self.ended:
            return []
        code = self._process.poll()   # first, so that the lines read below include everything it wrote
        events = [event for event in map(parse_event, self._new_lines()) if event is not None]
        self._verdict = self._verdict or any(isinstance(event, (DownloadFinished, DownloadFailed)) for event in events)
        if code is None:
            return events
        self.ended = True
        if self._cancelled:
            events.append(DownloadCancelled(_("The download of {name} was cancelled. What was downloaded is kept:"
                                              " Download resumes it.").format(name=self.name)))
        unexplained = not self._cancelled and not self._verdict
        if unexplained:   # its message names the log, which is kept for the user
            events.append(DownloadFailed(self._unexplained_failure(code)))
        self._remove_files(keep_log=unexplained)
        return events

    def cancel(self) -> None:
        """End the download's process tree now (the panel then gets DownloadCancelled from poll)."""
        if self._process is not None and not self.ended:
            self._cancelled = True
            process_tree.end_tree(self._process, grace=0.5)

    def _new_lines(self) -> list[str]:
        with open(self._events_path, "rb") as stream:
            stream.seek(self._read)
            data = stream.read()
        self._read += len(data)
        text = self._partial + data.decode("utf-8", errors="replace")
        *lines, self._partial = text.split("\n")   # a line still being written waits for the next poll
        return lines

    def _unexplained_failure(self, code: int) -> str:
        """The process ended without its JSON verdict (it crashed, or the engine is missing): the command's
        `error:` line, else the end of its output, and where the whole log is."""
        cause = command_message(self._log_path.read_text(encoding="utf-8", errors="replace"))
        return _("The download of {name} failed (exit code {code}): {cause}\nThe full output is in {log}.").format(
            name=self.name, code=code, cause=cause or _("no output"), log=self._log_path)

    def _remove_files(self, keep_log: bool) -> None:
        self._events_path.unlink(missing_ok=True)
        if not keep_log:
            self._log_path.unlink(missing_ok=True)
