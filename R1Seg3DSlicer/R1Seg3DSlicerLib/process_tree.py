"""Start a process so that its whole tree can be ended, and end it.

Inside Slicer the server is started through PythonSlicer, a CTKAppLauncher that runs the real Python
(`python-real`) as a child process and installs no signal handler. Ending only the launcher leaves the
server running with its model loaded (reviews/2026-12-07/slicer.md, risk 1). So the process is started
in a group of its own and the whole group is ended:

- POSIX: a new session (`start_new_session`), so the group id is the launcher's pid and `os.killpg`
  reaches the launcher and everything it started.
- Windows: a new process group without a console window; the tree is ended with psutil when Slicer has
  it (as SlicerMONAIAuto3DSeg does: "proc.kill() ... would only stop the launcher"), else with
  `taskkill /T /F`, which walks the same parent links.

Standard library only (psutil is optional).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

# How long end_tree waits for the processes to go after the forced kill.
KILL_WAIT_S = 5.0
_POLL_S = 0.05


def popen_options() -> dict:
    """Keyword arguments of subprocess.Popen that put the process (and what it starts) in a group of its own."""
    if os.name == "posix":
        return {"start_new_session": True}
    return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}


def pid_running(pid: int) -> bool:
    """True while `pid` is a live process (a zombie, which holds no memory, counts as ended)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    if os.name != "posix":
        return _windows_pid_running(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # Linux: a zombie is still "there" for kill(0); its state letter says it has ended
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _windows_pid_running(pid: int) -> bool:
    listing = subprocess.run(["tasklist", "/FI", f"PID eq {pid}", "/NH"], capture_output=True, text=True,
                             creationflags=subprocess.CREATE_NO_WINDOW)
    return str(pid) in listing.stdout


def end_tree(process: subprocess.Popen, grace: float, also: tuple[int, ...] = ()) -> None:
    """End `process` (started with popen_options) and every process it started: ask politely, wait up to `grace`
    seconds for the process and the pids in `also` (e.g. the real server behind a launcher) to go, then force.
    Returns once all of them have ended (or KILL_WAIT_S after the forced kill)."""
    watched = (process.pid, *also, *_descendants(process.pid))
    if os.name == "posix":
        _signal_group(process.pid, signal.SIGTERM)
        _wait_until_ended(process, watched, grace)
        _signal_group(process.pid, signal.SIGKILL)   # whatever is left of the group, launcher or not
    else:
        _end_windows_tree(process, grace)
    _wait_until_ended(process, watched, KILL_WAIT_S)


def kill_tree(process: subprocess.Popen, also: tuple[int, ...] = ()) -> None:
    """End the tree at once (a server stuck in native code ignores the polite request)."""
    end_tree(process, 0.0, also)


def _descendants(pid: int) -> list[int]:
    """The pids below `pid`, when psutil can tell (else the group signal alone reaches them on POSIX)."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _signal_group(group: int, signal_number: int) -> None:
    try:
        os.killpg(group, signal_number)
    except (ProcessLookupError, PermissionError):
        pass   # nothing left in the group


def _wait_until_ended(process: subprocess.Popen, pids, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        process.poll()   # reaps the direct child, so that it stops counting as running
        if not any(pid_running(pid) for pid in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def _end_windows_tree(process: subprocess.Popen, grace: float) -> None:
    try:
        import psutil
    except ImportError:
        # taskkill /T follows the parent links from the launcher down, so it must run while the launcher lives.
        subprocess.run(["taskkill", "/PID", str(process.pid), "/T", "/F"], capture_output=True,
                       creationflags=subprocess.CREATE_NO_WINDOW)
        return
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for member in tree:
        try:
            member.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for member in alive:
        try:
            member.kill()
        except psutil.Error:
            pass
