"""The panel's server process and its contract, against real processes on this machine.

- Stop, Cancel's forced kill, Unload and a change of model settings end the whole process tree, also when the
  server is started through a stand-in for PythonSlicer (a launcher that runs the real Python as its child and
  waits, with no signal handler, as CTKAppLauncher does). Checked by pid with psutil, not with the module's
  own helpers.
- A server that cannot start is explained with its log's cause, and the log is kept.
- The version contract (API header, /health's "api", 409 version_mismatch), 413 versus an unreachable server,
  https for remote servers, Test connection, and the model card with its licence and caveat.
"""
import functools
import http.server
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

psutil = pytest.importorskip("psutil")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "R1Seg3DSlicer"))

from r1seg_core.errors import InvalidInputError  # noqa: E402
from R1Seg3DSlicerLib import (connection, engine, events, model_card, server_client, server_process,  # noqa: E402
                              server_session)

SERVER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
START_S = 240.0   # a server starts in ~2 s; a machine shared with training can take minutes


def alive(pid: int) -> bool:
    """Independent of process_tree.pid_running: psutil's view, a zombie counting as ended."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    """A stand-in for PythonSlicer: runs the real Python with the same arguments as its child and waits for it.
    Like CTKAppLauncher it installs no signal handler, so SIGTERM ends it and leaves the child running."""
    path = tmp_path_factory.mktemp("launcher") / "PythonSlicer"
    path.write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                    "sys.exit(subprocess.Popen([sys.executable, *sys.argv[1:]]).wait())\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """Two folders that are not models: the server answers at once and its background load fails, which is all the
    process-tree checks need (no model is loaded on the shared CPU)."""
    return [str(tmp_path_factory.mktemp("not-a-model") / name) for name in ("a", "b")]


def through_launcher(launcher, *extra):
    def factory(*key):
        server = server_process.LocalServer(*key, threads=1, python=launcher, environment=SERVER_ENV)
        server._arguments += list(extra)
        return server
    return factory


def started(server) -> tuple[int, int]:
    """(launcher pid, real server pid) once the server answers; the server is the launcher's child."""
    server.wait_ready(START_S)
    launcher_pid, server_pid = server.pid, server.server_pid
    assert server_pid != launcher_pid
    assert server_pid in [child.pid for child in psutil.Process(launcher_pid).children(recursive=True)]
    assert server.client.health().get("pid", server_pid) == server_pid   # the server that answers is that child
    return launcher_pid, server_pid


def test_ending_only_the_launcher_would_leave_the_server_running(launcher, model_folders):
    """The control: what the old stop() did. If this ever fails, the stand-in no longer behaves like PythonSlicer."""
    server = through_launcher(launcher)(model_folders[0], "cpu", "auto", "auto")
    server.start()
    try:
        launcher_pid, server_pid = started(server)
        server._process.terminate()
        server._process.wait(5)
        time.sleep(0.5)
        assert not alive(launcher_pid) and alive(server_pid)
        assert server.client.health()["status"] == "ok"   # still answering, model and all
    finally:
        server.stop()
    assert not alive(server_pid)


def test_stop_and_cancels_forced_kill_end_the_whole_tree(launcher, model_folders):
    factory = through_launcher(launcher)
    for end in (lambda server: server.stop(), lambda server: server.kill()):
        server = factory(model_folders[0], "cpu", "auto", "auto")
        server.start()
        try:
            pids = started(server)
            began = time.monotonic()
            end(server)
            took = time.monotonic() - began
            assert not any(alive(pid) for pid in pids), pids
            assert took < 7.0, took
        finally:
            server.stop()


def test_unload_and_a_model_change_leave_one_server_at_most(launcher, model_folders, tmp_path):
    from R1Seg3DSlicerLib import scene

    headless = scene.create_headless_scene()
    node = scene.add_volume_node(headless.scene, np.zeros((4, 5, 6), np.int16), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3),
                                 "ct")
    volume = engine.R1SegSession().volume_from_node(node)
    session = server_session.ServerSession(server_factory=through_launcher(launcher))
    try:
        session.start_question(volume, "ct", "segment the liver", engine.AskOptions(model_dir=model_folders[0]))
        first = started(session.server)
        session.drop_question()
        # Another model: the first server's tree ends before the second starts, so two models never share the GPU.
        session.start_question(volume, "ct", "segment the liver", engine.AskOptions(model_dir=model_folders[1]))
        assert not any(alive(pid) for pid in first), first
        second = started(session.server)
        session.unload()
        assert not any(alive(pid) for pid in second), second
        assert session.server is None
    finally:
        session.shutdown()


def run(question_or_session, timeout=START_S) -> list:
    seen = []
    deadline = time.monotonic() + timeout
    while not any(isinstance(event, events.TERMINAL_EVENTS) for event in seen):
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)
        seen += question_or_session.poll()
    return seen


def test_a_server_that_cannot_start_says_why_and_keeps_its_log(launcher, model_folders):
    session = server_session.ServerSession(server_factory=through_launcher(launcher, "--no-such-option"))
    from R1Seg3DSlicerLib import scene

    headless = scene.create_headless_scene()
    node = scene.add_volume_node(headless.scene, np.zeros((4, 5, 6), np.int16), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3),
                                 "ct")
    try:
        session.start_question(engine.R1SegSession().volume_from_node(node), "ct", "segment the liver",
                               engine.AskOptions(model_dir=model_folders[0]))
        failed = run(session)[-1]
        assert isinstance(failed, events.FailedEvent)
        message = engine.describe_error(failed.error)
        assert message.startswith("The R1Seg3D server could not start"), message
        assert "unrecognized arguments: --no-such-option" in message   # argparse's words, from the log
        assert "stopped while answering" not in message
        log = Path(failed.error.log_path)
        assert str(log) in message and log.is_file()   # kept after the session stopped the server
        assert "--no-such-option" in log.read_text()
        assert session.server is None
        log.unlink()
    finally:
        session.shutdown()


def test_the_cause_of_a_failure_is_the_exception_a_traceback_ends_with():
    log = ("INFO:     Started server process [12]\n[2026-12-07 11:04:19] [WARNING] accelerator set to CPU\n"
           "Traceback (most recent call last):\n  File \"<frozen runpy>\", line 198, in _run_module_as_main\n"
           "  File \"/x/r1seg_core/server/command.py\", line 63, in command_serve\n    import uvicorn\n"
           "ModuleNotFoundError: No module named 'uvicorn'\n")
    assert server_process.log_cause(log) == ("File \"/x/r1seg_core/server/command.py\", line 63, in command_serve\n"
                                             "ModuleNotFoundError: No module named 'uvicorn'")
    plain = "INFO: loading\nr1seg serve: error: cannot listen on 127.0.0.1:80: Permission denied\n\n"
    assert server_process.log_cause(plain) == "r1seg serve: error: cannot listen on 127.0.0.1:80: Permission denied"


def test_an_upload_the_server_refuses_as_too_large_keeps_the_server(model_folders):
    """A real local server with a 1 MiB upload limit and a 2.4 MB CT: the panel says the CT is too large (not that the
    server is unreachable or died), and the same server process stays for the next question."""
    from R1Seg3DSlicerLib import scene

    def small_uploads(*key):
        server = server_process.LocalServer(*key, threads=1, environment=SERVER_ENV)
        server._arguments += ["--max-upload-mb", "1"]
        return server

    headless = scene.create_headless_scene()
    node = scene.add_volume_node(headless.scene, np.zeros((20, 240, 256), np.int16), (1.0, 1.0, 1.0), (0, 0, 0),
                                 np.eye(3), "ct")
    session = server_session.ServerSession(server_factory=small_uploads)
    try:
        session.start_question(engine.R1SegSession().volume_from_node(node), "ct", "segment the liver",
                               engine.AskOptions(model_dir=model_folders[0]))
        failed = run(session)[-1]
        assert isinstance(failed, events.FailedEvent) and isinstance(failed.error, connection.UploadTooLarge), failed
        message = engine.describe_error(failed.error)
        assert "too large" in message or "larger than" in message, message
        assert "cannot reach" not in message and "stopped while answering" not in message
        assert session.server is not None and session.server.running   # no new server for a 413
    finally:
        session.shutdown()


# ---- the contract, against a stand-in HTTP server on loopback --------------------------------------------------

class ContractServer(http.server.ThreadingHTTPServer):
    """An HTTP server on loopback whose replies each test sets: (status, JSON body) per "METHOD path"."""

    def __init__(self):
        self.replies, self.headers_seen = {}, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self):
                outer.headers_seen.append({name.lower(): value for name, value in self.headers.items()})
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                status, body = outer.replies.get(f"{self.command} {self.path}", (404, {"error": "not_found",
                                                                                       "detail": "no such thing"}))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _reply

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def contract_server():
    server = ContractServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


HEALTH = {"status": "ok", "model": "ready", "busy": False, "queued": 0, "version": "0.1.0", "api": 2}


def test_every_request_carries_the_api_version_and_test_connection_reports_the_server(contract_server):
    contract_server.replies["GET /health"] = (200, HEALTH)
    session = server_session.ServerSession()
    session.set_remote(contract_server.url, "secret-token")
    assert session.describe_connection() == f"Connected to R1Seg3D 0.1.0 (API 2) at {contract_server.url}; model: ready."
    assert all(headers.get("x-r1seg3d-api") == "2" for headers in contract_server.headers_seen)
    assert contract_server.headers_seen[-1]["authorization"] == "Bearer secret-token"


def test_a_server_of_another_api_version_is_named_with_both_versions(contract_server):
    contract_server.replies["GET /health"] = (200, {**HEALTH, "version": "0.3.0", "api": 3})
    client = connection.PanelClient(contract_server.url)
    with pytest.raises(connection.VersionMismatch) as mismatch:
        connection.check_health(client)
    message = str(mismatch.value)
    assert "R1Seg3D 0.3.0 (API 3)" in message and "R1Seg3D 0.1.0 (API 2)" in message, message
    # A server from before the contract: no "api" in /health.
    contract_server.replies["GET /health"] = (200, {"status": "ok", "model": "ready", "version": "1"})
    with pytest.raises(connection.VersionMismatch, match=r"R1Seg3D 1 \(API 1\)"):
        connection.check_health(client)
    # The server refuses the request itself (409 version_mismatch): its message and ours, and the question is not
    # taken for a dead server.
    contract_server.replies["POST /conversations"] = (409, {"error": "version_mismatch", "version": "0.3.0", "api": 3,
                                                            "message": "this server speaks API 3"})
    with pytest.raises(connection.VersionMismatch) as refused:
        client.new_conversation()
    assert "this server speaks API 3" in str(refused.value) and "API 2" in str(refused.value)


def test_other_conflicts_still_read_as_the_servers_own_error(contract_server):
    contract_server.replies["GET /jobs/j1/result"] = (409, {"error": "not_ready", "detail": "the job is still running"})
    with pytest.raises(Exception) as error:
        connection.PanelClient(contract_server.url).result("j1")
    assert not isinstance(error.value, connection.VersionMismatch)
    assert "the job is still running" in str(error.value) and error.value.status == 409


def test_a_413_is_told_apart_from_an_unreachable_server(contract_server):
    contract_server.replies["GET /health"] = (200, HEALTH)      # no limits given: the client sends, the server refuses
    from r1seg_core.server.nrrd import volume_to_nrrd_bytes
    from r1seg_core.volume import Volume

    small_nrrd = volume_to_nrrd_bytes(Volume(np.zeros((2, 3, 4), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)))
    contract_server.replies["POST /volumes"] = (413, {"error": "too_large", "detail": "the CT is 3 GiB decoded; the"
                                                      " limit is 2 GiB (--max-ct-mb)"})
    client = connection.PanelClient(contract_server.url)
    with pytest.raises(connection.UploadTooLarge, match="the limit is 2 GiB"):
        client.upload(small_nrrd)
    contract_server.shutdown()
    contract_server.server_close()
    from r1seg_core.server.client import ServerUnreachable

    with pytest.raises(ServerUnreachable):
        client.upload(small_nrrd)


@pytest.mark.parametrize("url, insecure, allowed", [
    ("https://gpu-host:8740", False, True),
    ("http://127.0.0.1:8740", False, True),
    ("http://localhost:8740", False, True),
    ("http://gpu-host:8740", False, False),
    ("http://10.0.0.7:8740", False, False),
    ("http://10.0.0.7:8740", True, True),
    ("ftp://gpu-host", True, False),
])
def test_a_remote_server_needs_https_or_an_explicit_trusted_network(url, insecure, allowed):
    if allowed:
        connection.check_server_url(url, insecure)
        return
    with pytest.raises(InvalidInputError) as refused:
        connection.check_server_url(url, insecure)
    assert url in str(refused.value)
    if url.startswith("http:"):
        assert "https://" in str(refused.value) and "Insecure connection" in str(refused.value)


def test_a_plain_http_remote_is_refused_before_anything_is_sent(contract_server):
    session = server_session.ServerSession()
    session.set_remote("http://192.0.2.1:8740", "token")   # TEST-NET-1: nothing listens there
    with pytest.raises(InvalidInputError, match="unencrypted"):
        session.start_question(None, "ct", "segment the liver", engine.AskOptions())
    assert session.server is None   # and no local server was started instead


# ---- the model card --------------------------------------------------------------------------------------------

def test_the_default_models_card_its_licence_and_the_demonstration_caveat():
    from r1seg_core import default_model_path

    folder = default_model_path()
    card_json = json.loads((folder / "config.json").read_text())["card"]
    card = model_card.local_model_card(None)
    assert card.licence == card_json["licence"] and card.name == card_json["name"]
    assert card.text == (folder / "MODEL_CARD.md").read_text()
    assert card.caveat == "Demonstration model, not for clinical use."
    assert card.caveat in model_card.summary(card) and card.licence in model_card.summary(card)


def test_a_card_without_the_mark_has_no_caveat_and_a_placeholder_always_has_one(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"card": {"name": "Clinic model", "licence": "CC-BY-4.0",
                                                               "description": "validated on 2000 CTs"}}))
    card = model_card.local_model_card(str(tmp_path))
    assert (card.caveat, card.licence) == ("", "CC-BY-4.0") and "validated on 2000 CTs" in card.text
    server_card = model_card.make_card({"name": "x", "untrained": True}, "", "https://gpu-host:8740")
    assert server_card.caveat.startswith("Untrained placeholder") and server_card.licence == "not stated in its card"
    missing = model_card.local_model_card(str(tmp_path / "nowhere"))
    assert "no readable config.json" in missing.text


def test_a_saved_models_card_is_the_readme_the_engine_wrote(tmp_path):
    import subprocess

    folder = tmp_path / "tiny"
    subprocess.run([sys.executable, "-m", "r1seg_core.cli", "init-model", str(folder), "--preset", "tiny"], check=True,
                   capture_output=True)
    card = model_card.local_model_card(str(folder))
    assert card.text == (folder / "README.md").read_text() and "window (D,H,W)" in card.text
    assert card.caveat.startswith("Untrained placeholder")


def test_a_remote_servers_card_comes_from_its_model_endpoint(contract_server):
    contract_server.replies["GET /model"] = (200, {"card": {"name": "Server model", "licence": "Apache-2.0",
                                                            "description": "not for clinical use"},
                                                   "text": "# Server model\n", "placeholder": False})
    session = server_session.ServerSession()
    session.set_remote(contract_server.url, "")
    card = session.model_card(None)
    assert (card.name, card.licence, card.text, card.source) == ("Server model", "Apache-2.0", "# Server model\n",
                                                                 contract_server.url)
    assert card.caveat == "Demonstration model, not for clinical use."


def test_while_the_model_loads_the_panel_says_how_long_the_first_load_takes(contract_server):
    from r1seg_core.volume import Volume

    contract_server.replies.update({
        "GET /health": (200, HEALTH),        # the client reads the server's limits before an upload
        "POST /volumes": (201, {"volume_id": "v", "shape": [4, 5, 6]}),
        "POST /conversations": (201, {"conversation_id": "c1"}),
        "POST /jobs": (202, {"job_id": "j1", "state": "queued", "position": 0}),
        "GET /jobs/j1": (200, {"state": "loading", "done": 0, "total": 0, "stage": "", "position": 0}),
    })
    volume = Volume(np.zeros((4, 5, 6), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    question = server_client.ServerQuestion(1, volume, "segment the liver", engine.AskOptions(),
                                            client=connection.PanelClient(contract_server.url), conversation_id="c1")
    stages = [event.stage for _ in range(3) for event in question.poll()]
    assert stages == ["Sent to the server", "Loading the model: about 20-50 s the first time, seconds afterwards"]
