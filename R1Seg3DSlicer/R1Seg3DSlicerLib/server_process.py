"""A local `r1seg serve` process that the Slicer module starts, reuses and stops.

The model runs in that process, not on a thread of Slicer's: Slicer's main thread keeps Python's
global lock while Qt idles, which starves any Python worker thread (issue #13). Standard library
only; nothing here blocks for long, so the panel can drive it from a timer:

    server = LocalServer(model_dir, device, dtype); server.start()
    ... timer: server.poll_ready() -> True once it answers (raises ServerProcessError if it died)
    server.client.submit(...); ...; server.stop()

The server listens on a free loopback port and requires a fresh random token, so other users of the
machine cannot use it; the token file is private to this user and removed with the process.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from r1seg_core.server.client import Client, ServerError

# Time the process has to exit after SIGTERM before it is killed.
STOP_GRACE_S = 1.0


class ServerProcessError(ServerError):
    """The local server did not start, or died; the message carries the end of its log."""


def slicer_python() -> str:
    """The interpreter that runs the server: Slicer's own (PythonSlicer sets up its library paths), else this one."""
    launcher = shutil.which("PythonSlicer") if "slicer" in Path(sys.executable).name.lower() else None
    return launcher or sys.executable


class LocalServer:
    def __init__(self, model_dir: str | None = None, device: str = "auto", dtype: str = "auto", profile: str = "auto",
                 threads: int | None = None, python: str | None = None, environment: dict | None = None,
                 parent_pid: int | None = None):
        self.key = (model_dir or None, device, dtype, profile)
        # The server ends with its parent (this process, Slicer, unless told otherwise), so a Slicer that crashes
        # or is killed does not leave a model holding the GPU.
        self._arguments = ["--device", device, "--dtype", dtype, "--profile", profile,
                           "--parent-pid", str(parent_pid or os.getpid())] \
            + (["--model", model_dir] if model_dir else []) + (["--threads", str(threads)] if threads else [])
        self._python = python or slicer_python()
        self._environment = environment
        self._folder: Path | None = None
        self._process: subprocess.Popen | None = None
        self._log = None
        self.client: Client | None = None

    @property
    def pid(self) -> int | None:
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
        self._log = open(self._folder / "server.log", "wb")
        command = [self._python, "-m", "r1seg_core.cli", "serve", "--port", "0", "--ready-file",
                   str(self._folder / "ready.json"), "--token-file", str(token_file), *self._arguments]
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                         env=self._environment, start_new_session=True)

    def poll_ready(self) -> bool:
        """True once the server answers; raises ServerProcessError when the process has ended."""
        self.check_alive()
        if self.client is None:
            ready = self._folder / "ready.json"
            if not ready.exists():
                return False
            self.client = Client(json.loads(ready.read_text(encoding="utf-8"))["url"], self._token)
        return True

    def wait_ready(self, timeout: float) -> Client:
        """Block until the server answers (scripts and tests; the panel uses poll_ready from a timer)."""
        deadline = time.monotonic() + timeout
        while not self.poll_ready():
            if time.monotonic() > deadline:
                self.stop()
                raise ServerProcessError(f"the R1Seg3D server did not start within {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.05)
        return self.client

    def check_alive(self) -> None:
        if self._process is None:
            raise ServerProcessError("the R1Seg3D server was not started")
        code = self._process.poll()
        if code is not None:
            raise ServerProcessError(f"the R1Seg3D server process ended (exit code {code})\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self._folder / "server.log").read_text(encoding="utf-8", errors="replace")
        except (OSError, TypeError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """End the process (SIGTERM, then SIGKILL after `grace` seconds) and remove its files; frees all its memory."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(grace)
                except subprocess.TimeoutExpired:
                    self.kill()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        self.client = None

    def kill(self) -> None:
        """SIGKILL the process group at once (a server stuck in native code ignores SIGTERM's handler)."""
        if self._process is not None and self._process.poll() is None:
            if os.name == "posix":
                os.killpg(self._process.pid, signal.SIGKILL)
            else:
                self._process.kill()
            self._process.wait(5.0)
