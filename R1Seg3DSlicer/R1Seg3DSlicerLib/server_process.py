"""A local `r1seg serve` process that the Slicer module starts, reuses and stops.

The model runs in that process, not on a thread of Slicer's: Slicer's main thread keeps Python's
global lock while Qt idles, which starves any Python worker thread (issue #13). Standard library
only; nothing here blocks for long, so the panel can drive it from a timer:

    server = LocalServer(model_dir, device, dtype); server.start()
    ... timer: server.poll_ready() -> True once it answers (raises ServerProcessError if it died)
    server.client.submit(...); ...; server.stop()

Stopping ends the whole process tree (process_tree.py): inside Slicer the process started is the
PythonSlicer launcher, and the server is its child. The server listens on a free loopback port and
requires a fresh random token, so other users of the machine cannot use it; the token file is private
to this user and removed with the process. Its log is a file of its own: removed after a clean stop,
kept (and named in the error) when the server failed, so the cause can be read.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import r1seg_core
from r1seg_core.server.client import ServerError

from . import process_tree
from .connection import PanelClient
from .i18n import tr as _

# Time the process has to exit after the polite request before the tree is killed.
STOP_GRACE_S = 1.0
# Importing torch and the web stack takes a few seconds; on a cold Windows disk, much longer. The model loads
# after the server answers, so this bounds only the start itself.
START_TIMEOUT_S = 180.0
# Lines of a log that say nothing about a failure: uvicorn's and the loaders' routine chatter.
_ROUTINE_LOG_LINE = re.compile(r"\b(INFO|DEBUG)\b|\[WARNING\]|^\s*$")


class ServerProcessError(ServerError):
    """The local server did not start, or died. `cause` is what its log says went wrong; `log_path` is the log,
    kept for the user."""

    def __init__(self, message: str, cause: str = "", log_path: Path | None = None):
        super().__init__(message)
        self.cause, self.log_path = cause, log_path


class ServerStartError(ServerProcessError):
    """The local server ended, or did not answer in time, before it ever answered."""


def slicer_python() -> str:
    """The interpreter that runs the server: Slicer's own (PythonSlicer sets up its library paths), else this one."""
    launcher = shutil.which("PythonSlicer") if "slicer" in Path(sys.executable).name.lower() else None
    return launcher or sys.executable


def log_cause(text: str, lines: int = 6) -> str:
    """The lines of a server log that say why it failed: the exception a traceback ends with (and where it was
    raised), else the last lines that are not routine INFO/DEBUG chatter."""
    all_lines = text.splitlines()
    if "Traceback (most recent call last):" in text:
        last = max(index for index, line in enumerate(all_lines) if line.startswith("Traceback (most recent call"))
        traceback = all_lines[last:]
        frames = [index for index, line in enumerate(traceback) if line.startswith("  File ")]
        if frames:   # the innermost frame's location, then the exception (which may span lines)
            exception = [line for line in traceback[frames[-1] + 1:] if not line.startswith("    ")]
            return "\n".join([traceback[frames[-1]].strip(), *exception][-lines:])
    meaningful = [line for line in all_lines if not _ROUTINE_LOG_LINE.search(line)]
    return "\n".join(meaningful[-lines:])


def engine_search_path(environment: dict) -> dict:
    """`environment` with the folder that holds r1seg_core first on PYTHONPATH: the server then imports the engine
    this module uses, whatever the launcher's settings say (reviews/2026-12-07/slicer.md, risk 3)."""
    engine_root = str(Path(r1seg_core.__file__).resolve().parent.parent)
    paths = [engine_root, *[path for path in environment.get("PYTHONPATH", "").split(os.pathsep) if path]]
    return {**environment, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


class LocalServer:
    def __init__(self, model_dir: str | None = None, device: str = "auto", dtype: str = "auto", profile: str = "auto",
                 threads: int | None = None, python: str | None = None, environment: dict | None = None,
                 parent_pid: int | None = None, start_timeout: float = START_TIMEOUT_S):
        self.key = (model_dir or None, device, dtype, profile)
        # The server ends with its parent (this process, Slicer, unless told otherwise), so a Slicer that crashes
        # or is killed does not leave a model holding the GPU.
        self._arguments = ["--device", device, "--dtype", dtype, "--profile", profile,
                           "--parent-pid", str(parent_pid or os.getpid())] \
            + (["--model", model_dir] if model_dir else []) + (["--threads", str(threads)] if threads else [])
        self._python = python or slicer_python()
        self._environment = environment
        self._start_timeout = start_timeout
        self._folder: Path | None = None
        self._process: subprocess.Popen | None = None
        self._log = None
        self._started_at = None
        self.log_path: Path | None = None
        self.server_pid: int | None = None   # the real server's pid (behind a launcher, not `pid`)
        self.failed = False                  # it ended or timed out by itself: its log is kept
        self.client: PanelClient | None = None

    @property
    def pid(self) -> int | None:
        """The pid of the process started (inside Slicer: the PythonSlicer launcher)."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def ready(self) -> bool:
        return self.client is not None and self.running

    def start(self) -> None:
        """Launch the process and return at once; `poll_ready` tells when it answers."""
        self._folder = Path(tempfile.mkdtemp(prefix="r1seg-server-"))   # mode 0700
        token = secrets.token_urlsafe(32)
        token_file = self._folder / "token"
        token_file.touch(0o600)
        token_file.write_text(token, encoding="utf-8")
        self._token = token
        handle, log_path = tempfile.mkstemp(prefix="r1seg-server-", suffix=".log")   # mode 0600, outlives the folder
        self.log_path = Path(log_path)
        self._log = os.fdopen(handle, "wb")
        self.failed = False
        command = [self._python, "-m", "r1seg_core.cli", "serve", "--port", "0", "--ready-file",
                   str(self._folder / "ready.json"), "--token-file", str(token_file), *self._arguments]
        self._started_at = time.monotonic()
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                         env=engine_search_path(dict(self._environment or os.environ)),
                                         **process_tree.popen_options())

    def poll_ready(self) -> bool:
        """True once the server answers; raises ServerProcessError when the process has ended, ServerStartError when
        it did not answer within the start timeout."""
        self.check_alive()
        if self.client is None:
            ready = self._folder / "ready.json"
            if not ready.exists():
                if time.monotonic() - self._started_at > self._start_timeout:
                    self._fail(ServerStartError, _("the R1Seg3D server did not start within {seconds:.0f} s").format(
                        seconds=self._start_timeout))
                return False
            announced = json.loads(ready.read_text(encoding="utf-8"))
            self.server_pid = int(announced["pid"])
            self.client = PanelClient(announced["url"], self._token)
        return True

    def wait_ready(self, timeout: float) -> PanelClient:
        """Block until the server answers (scripts and tests; the panel uses poll_ready from a timer)."""
        deadline = time.monotonic() + timeout
        while not self.poll_ready():
            if time.monotonic() > deadline:
                try:
                    self._fail(ServerStartError, _("the R1Seg3D server did not start within {seconds:.0f} s").format(
                        seconds=timeout))
                finally:
                    self.stop()
            time.sleep(0.05)
        return self.client

    def check_alive(self) -> None:
        if self._process is None:
            raise ServerProcessError(_("the R1Seg3D server was not started"))
        code = self._process.poll()
        if code is not None:
            if self.client is None:
                self._fail(ServerStartError, _("the R1Seg3D server could not start (exit code {code})").format(code=code))
            self._fail(ServerProcessError, _("the R1Seg3D server process ended (exit code {code})").format(code=code))

    def _fail(self, error_class, message: str):
        """Raise `error_class` with the log's cause; the log is kept (stop() will not remove it)."""
        self.failed = True
        if self._log is not None:
            self._log.flush()
        cause = log_cause(self.log_text())
        raise error_class(f"{message}\n{cause}".strip(), cause, self.log_path)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except (OSError, AttributeError):
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """End the process tree (the launcher and the server behind it: politely, then by force after `grace`
        seconds) and remove its files, but keep the log of a server that failed; frees all of the model's memory."""
        if self._process is not None:
            process_tree.end_tree(self._process, grace, also=self._server_pids())
            self._process = None
        self._close_files()

    def kill(self) -> None:
        """End the process tree at once (a server stuck in native code ignores the polite request)."""
        if self._process is not None:
            process_tree.kill_tree(self._process, also=self._server_pids())

    def _server_pids(self) -> tuple[int, ...]:
        return (self.server_pid,) if self.server_pid is not None else ()

    def _close_files(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.log_path is not None and not self.failed:
            self.log_path.unlink(missing_ok=True)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        self.client = None
