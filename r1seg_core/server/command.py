"""`r1seg serve`: its options, the refusal to listen beyond loopback without a token, and the socket.

Kept apart from `app` so that building the `r1seg` parser never imports FastAPI.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from ..errors import InvalidInputError, R1SegError
from . import protocol

# How often --parent-pid is looked at, and how long a graceful shutdown may take before the process ends anyway.
PARENT_POLL_S = 0.5
SHUTDOWN_GRACE_S = 10.0


def process_exists(pid: int) -> bool:
    """True while process `pid` runs. POSIX: signal 0, and on Linux a zombie (ended, not yet reaped by its parent,
    e.g. in a container whose init does not reap) counts as ended. Windows: os.kill would terminate it, so the
    process handle is asked instead."""
    if os.name == "nt":
        import ctypes

        synchronize, wait_timeout = 0x00100000, 0x102
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(synchronize, False, pid)
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) == wait_timeout
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # it exists, as another user's process
        return not _is_zombie(pid)
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:       # no procfs (macOS), or the process has just been reaped
        return False
    # "pid (command) state ...": the command may contain spaces and parentheses, the state follows the last ")".
    return stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"])


def _end_with_parent(server, parent_pid: int) -> None:
    """Stop serving once `parent_pid` has ended (the Slicer that started this server crashed or was killed, so
    nothing else would ever stop it and its model would hold the memory); end the process if that hangs."""
    def watch():
        while process_exists(parent_pid):
            time.sleep(PARENT_POLL_S)
        print(f"r1seg serve: parent process {parent_pid} has ended; shutting down", file=sys.stderr, flush=True)
        server.should_exit = True
        time.sleep(SHUTDOWN_GRACE_S)
        os._exit(1)   # still here: a question stuck in native code holds the shutdown

    threading.Thread(target=watch, name="r1seg parent watch", daemon=True).start()


def command_serve(args) -> int:
    import uvicorn

    from .app import create_app
    from .http import guarded_protocol
    from .jobs import ServeSettings

    loopback = protocol.is_loopback(args.host)
    if not loopback and not args.token_file:
        raise InvalidInputError(f"refusing to listen on {args.host} without --token-file: anyone who can reach this "
                                "machine could run the model and read the CTs sent to it. Create a token file "
                                "(chmod 600) and pass --token-file, or keep the default --host 127.0.0.1")
    if args.max_upload_mb <= 0 or args.max_ct_mb <= 0 or args.max_waiting < 0:
        raise InvalidInputError("--max-upload-mb and --max-ct-mb must be positive and --max-waiting at least 0")
    if not args.request_timeout > 0 or not args.keep_results_s >= 0:
        raise InvalidInputError("--request-timeout must be positive and --keep-results-s at least 0")
    if args.parent_pid is not None and (args.parent_pid <= 0 or not process_exists(args.parent_pid)):
        raise InvalidInputError(f"--parent-pid {args.parent_pid}: no such process is running")
    token = protocol.read_token(args.token_file) if args.token_file else None
    settings = ServeSettings(model_dir=args.model, device=args.device, dtype=args.dtype, profile=args.profile,
                             threads=args.threads, max_waiting=args.max_waiting, keep_results_s=args.keep_results_s)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as error:
        sock.close()
        raise R1SegError(f"cannot listen on {args.host}:{args.port}: {error.strerror}") from None
    port = sock.getsockname()[1]
    url = f"http://{'[' + args.host + ']' if family == socket.AF_INET6 else args.host}:{port}"

    def on_ready(app):
        # Written only once requests are served, and atomically, so a launcher that sees the file can connect.
        if args.ready_file:
            ready = Path(args.ready_file)
            temporary = ready.with_name(ready.name + ".tmp")
            temporary.write_text(json.dumps({"url": url, "pid": os.getpid()}), encoding="utf-8")
            os.replace(temporary, ready)
        print(f"r1seg serve: listening on {url} (model {args.model or 'default'}; token "
              f"{'required' if token else 'not required'})", file=sys.stderr, flush=True)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(settings, token=token, max_upload_bytes=args.max_upload_mb << 20, loopback_only=loopback,
                     on_ready=on_ready, max_ct_bytes=args.max_ct_mb << 20)
    config = uvicorn.Config(app, log_level="warning", server_header=False, http=guarded_protocol(args.request_timeout),
                            timeout_keep_alive=max(1, round(args.request_timeout)))
    server = uvicorn.Server(config)
    if args.parent_pid is not None:
        _end_with_parent(server, args.parent_pid)
    server.run(sockets=[sock])
    return 0


def add_parser(commands) -> None:
    serve = commands.add_parser("serve", help="keep a model loaded and answer questions over HTTP")
    serve.add_argument("--model", help="model folder (default: the bundled default model)")
    serve.add_argument("--host", default=protocol.DEFAULT_HOST,
                       help="address to listen on (default 127.0.0.1; any other needs --token-file)")
    serve.add_argument("--port", type=int, default=protocol.DEFAULT_PORT,
                       help=f"port (default {protocol.DEFAULT_PORT}; 0 picks a free one, see --ready-file)")
    serve.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    serve.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    serve.add_argument("--profile", choices=("auto", "project", "original"), default="auto")
    serve.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    serve.add_argument("--token-file", help="file holding the token every request must send as 'Authorization: Bearer'")
    serve.add_argument("--max-upload-mb", type=int, default=protocol.DEFAULT_MAX_UPLOAD_MB,
                       help=f"largest CT upload in MiB (default {protocol.DEFAULT_MAX_UPLOAD_MB})")
    serve.add_argument("--max-ct-mb", type=int, default=protocol.DEFAULT_MAX_CT_MB,
                       help=f"largest decoded CT in MiB, checked from its header before decoding (default "
                            f"{protocol.DEFAULT_MAX_CT_MB}: a whole-body CT)")
    serve.add_argument("--request-timeout", type=float, default=protocol.DEFAULT_REQUEST_TIMEOUT_S,
                       help="seconds a client may take to send its request headers, or let its body stall "
                            f"(default {protocol.DEFAULT_REQUEST_TIMEOUT_S:g})")
    serve.add_argument("--keep-results-s", type=float, default=protocol.DEFAULT_KEEP_RESULTS_S,
                       help="seconds a finished question's masks stay fetchable; fetched masks go at once "
                            f"(default {protocol.DEFAULT_KEEP_RESULTS_S:g})")
    serve.add_argument("--max-waiting", type=int, default=2,
                       help="questions that may wait behind the running one; more are refused as busy (default 2)")
    serve.add_argument("--ready-file", help="write {\"url\", \"pid\"} as JSON here once the server answers")
    serve.add_argument("--parent-pid", type=int, default=None,
                       help="shut down when this process ends (the Slicer module passes its own pid)")
    serve.set_defaults(handler=command_serve)
