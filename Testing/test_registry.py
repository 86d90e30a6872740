"""Issue 22: `r1seg models` and `r1seg models get NAME` against a Hugging Face Hub on loopback; `--model NAME`.

The hub here is a small HTTP server implementing the part of the Hub API huggingface_hub uses for a download
(`/api/models/{repo}/revision/{rev}` with file metadata; HEAD and GET of `/{repo}/resolve/{rev}/{file}` with
X-Repo-Commit, ETag, sizes and byte ranges). It serves repositories in the published layouts, built from the tiny
models the ORIGINAL code wrote (shared/reference/compat). Checksums are checked against hashlib on the compat
files themselves, not against the project's helpers. No test reaches the internet.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from r1seg_core.cli import main as r1seg
from r1seg_core.registry.catalogue import BUNDLED_REGISTRY

PHI3_COMMIT = "1" * 40
SAM_COMMIT = "2" * 40
CLIP_COMMIT = "3" * 40
LFS_SUFFIXES = (".safetensors", ".bin")
CONFIG_NAME = "r1seg_compat.config.json"   # the tiny sizes, served next to the weights (published sizes need none)


class Hub:
    """Repositories {repo: (commit, {file: bytes})}, a request log and switchable faults."""

    def __init__(self, repos: dict):
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []
        self.drop_after: dict[str, int] = {}     # file -> bytes sent before the connection is cut (then HTTP 503)
        self.tampered: set[str] = set()          # files served with one byte changed (metadata unchanged)
        self.declared_size: dict[str, int] = {}  # file -> size the metadata claims

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                hub.requests.append((self.command, self.path.split("?")[0], self.headers.get("Range")))
                path = self.path.split("?")[0]
                if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
                    return self.info(*match.groups())
                if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    return self.file(*match.groups(), body=body)
                self.fail(404, "RepoNotFound")

            def fail(self, status, code=None):
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def revision(self, repo, revision):
                if repo not in hub.repos:
                    return self.fail(404, "RepoNotFound")
                commit, files = hub.repos[repo]
                if revision not in ("main", commit):
                    return self.fail(404, "RevisionNotFound")
                return commit, files

            def info(self, repo, revision):
                found = self.revision(repo, revision)
                if found is None:
                    return
                commit, files = found
                siblings = []
                for name, data in files.items():
                    size = hub.declared_size.get(name, len(data))
                    sibling = {"rfilename": name, "size": size, "blobId": git_blob_id(data)}
                    if name.endswith(LFS_SUFFIXES):
                        sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": size, "pointerSize": 134}
                    siblings.append(sibling)
                payload = json.dumps({"id": repo, "modelId": repo, "sha": commit, "private": False,
                                      "siblings": siblings}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def file(self, repo, revision, name, body):
                found = self.revision(repo, revision)
                if found is None:
                    return
                commit, files = found
                if name not in files:
                    return self.fail(404, "EntryNotFound")
                data = files[name]
                etag = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else git_blob_id(data)
                if name in hub.tampered:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                if body and name in hub.drop_after and hub.drop_after[name] < 0:
                    return self.fail(503)
                start = 0
                if body and (ranged := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")):
                    start = int(ranged.group(1))
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                cut = hub.drop_after.get(name)
                if cut is not None:
                    self.wfile.write(data[start:start + cut])
                    self.wfile.flush()
                    hub.drop_after[name] = -1      # the server is gone for this file until healed
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def published_repositories(compat: Path) -> dict:
    """The three repositories as the authors' README links them, with the tiny models inside."""
    description = json.loads((compat / "r1seg3d_phi3_tiny.config.json").read_text())
    phi3 = folder_files(compat / "r1seg3d_phi3_tiny.tokenizer")
    phi3.update({"config.json": json.dumps(description["hf_config_json"]).encode(),
                 "generation_config.json": json.dumps(description["hf_generation_config_json"]).encode(),
                 "model.safetensors": (compat / "r1seg3d_phi3_tiny.safetensors").read_bytes(),
                 CONFIG_NAME: (compat / "r1seg3d_phi3_tiny.config.json").read_bytes()})
    sam = {"r1seg_3dsam.safetensors": (compat / "r1seg3d_sam_tiny.safetensors").read_bytes(),
           CONFIG_NAME: (compat / "r1seg3d_sam_tiny.config.json").read_bytes(), "README.md": b"# R1Seg-3D-SAM\n"}
    return {"lihao0011/R1Seg-3D-Phi-3-4B": (PHI3_COMMIT, phi3), "lihao0011/R1Seg-3D-SAM": (SAM_COMMIT, sam),
            "openai/clip-vit-base-patch32": (CLIP_COMMIT, folder_files(compat / "r1seg3d_sam_tiny.tokenizer"))}


def test_registry(path: Path) -> Path:
    """The bundled entries (their repositories and file patterns) with the tiny sizes' config added; Phi-3 pinned
    to its commit, SAM left unpinned (resolved and recorded at download), and one entry pinned to a lost commit."""
    entries = {e["name"]: e for e in json.loads(BUNDLED_REGISTRY.read_text())["models"]}
    phi3, sam = entries["r1seg3d-phi3"], entries["r1seg3d-sam"]
    phi3["sources"][0]["revision"] = PHI3_COMMIT
    phi3["convert"]["config"] = CONFIG_NAME
    sam["sources"][0]["files"].append(CONFIG_NAME)
    sam["convert"]["config"] = CONFIG_NAME
    lost = json.loads(json.dumps(phi3))
    lost.update(name="lost-revision")
    lost["sources"][0]["revision"] = "f" * 40
    path.write_text(json.dumps({"models": [entries["default"], phi3, sam, lost]}))
    return path


test_registry.__test__ = False   # a helper, not a test


@pytest.fixture
def hub(compat_dir, tmp_path, monkeypatch):
    server = Hub(published_repositories(compat_dir))
    url = server.start()
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("R1SEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("R1SEG_REGISTRY", str(test_registry(tmp_path / "registry.json")))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server
    server.server.shutdown()


def error_line(capsys) -> str:
    """The one `error:` line of the last command (huggingface_hub's retry warnings may come before it)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_models_lists_every_known_model_with_source_size_memory_and_licence(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("R1SEG_CACHE", str(tmp_path))
    monkeypatch.delenv("R1SEG_REGISTRY", raising=False)
    assert r1seg(["models"]) == 0
    out = capsys.readouterr().out
    for name, repo in (("r1seg3d-phi3", "lihao0011/R1Seg-3D-Phi-3-4B"), ("r1seg3d-llama3", "lihao0011/R1Seg-3D-llama-3-8B"),
                       ("r1seg3d-sam", "lihao0011/R1Seg-3D-SAM"), ("segvol-vit", "BAAI/SegVol")):
        block = out.split(f"\n{name}  [")[1].split("\n\n")[0]
        assert "not installed" in block and repo in block and "download:" in block and "memory:" in block
        assert "licence:" in block
    assert out.count("none stated") >= 3 and "default  [installed (bundled)]" in out


def test_get_pins_checks_and_converts_then_model_name_answers_offline(hub, compat_dir, tmp_path, capsys, monkeypatch):
    assert r1seg(["models", "get", "r1seg3d-phi3"]) == 0
    folder = tmp_path / "cache" / "models" / "r1seg3d-phi3"
    record = json.loads((folder / "download.json").read_text())
    source = record["sources"][0]
    assert source["commit"] == PHI3_COMMIT and source["revision_pinned"] == PHI3_COMMIT
    assert source["files"]["model.safetensors"]["sha256"] == sha256_of(compat_dir / "r1seg3d_phi3_tiny.safetensors")
    assert "none stated" in record["licence"]
    assert (folder / "model.safetensors").is_file() and not (tmp_path / "cache" / "downloads" / "r1seg3d-phi3").exists()
    # Every file was fetched at the pinned commit, never at a branch.
    assert all(PHI3_COMMIT in path for method, path, _ in hub.requests if "/resolve/" in path)

    asked = len(hub.requests)
    assert r1seg(["models", "get", "r1seg3d-phi3"]) == 0 and len(hub.requests) == asked   # installed: no network
    assert f"r1seg3d-phi3 is installed: {folder}" in capsys.readouterr().out

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / "answer.nii.gz"
    from r1seg_core import sample_ct_path
    assert r1seg(["ask", str(sample_ct_path()), "Where is the liver? Please answer and segment.", "--model",
                  "r1seg3d-phi3", "--no-sliding-window", "-o", str(output)]) == 0
    assert output.is_file() and len(hub.requests) == asked


def test_interrupted_download_resumes_from_where_it_stopped(hub, compat_dir, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub writes what it received in chunks of 10 MB; smaller chunks let a 1 MB file be cut mid-way.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 65536)
    weights = compat_dir / "r1seg3d_sam_tiny.safetensors"
    cut = 200_000
    hub.drop_after["r1seg_3dsam.safetensors"] = cut
    assert r1seg(["models", "get", "r1seg3d-sam"]) == 1
    error = error_line(capsys)
    assert "interrupted" in error and "run the same command to resume" in error
    assert not (tmp_path / "cache" / "models" / "r1seg3d-sam").exists()
    part = tmp_path / "cache" / "downloads" / "r1seg3d-sam" / "weights" / "r1seg_3dsam.safetensors.part"
    kept = part.stat().st_size
    assert 0 < kept <= cut and part.read_bytes() == weights.read_bytes()[:kept]

    del hub.drop_after["r1seg_3dsam.safetensors"]     # the server is back
    assert r1seg(["models", "get", "r1seg3d-sam"]) == 0
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith("r1seg_3dsam.safetensors") and r]
    assert ranges[-1] == f"bytes={kept}-"   # the second run asked only for the rest
    record = json.loads((tmp_path / "cache" / "models" / "r1seg3d-sam" / "download.json").read_text())
    weights_source = next(s for s in record["sources"] if s["role"] == "weights")
    assert weights_source["revision_pinned"] is None and weights_source["commit"] == SAM_COMMIT
    assert weights_source["files"]["r1seg_3dsam.safetensors"]["sha256"] == sha256_of(weights)
    assert r1seg(["info", "r1seg3d-sam"]) == 0 and "R1Seg-3D" in capsys.readouterr().out


def test_a_file_that_fails_its_checksum_is_refused_and_deleted(hub, tmp_path, capsys):
    hub.tampered.add("model.safetensors")
    assert r1seg(["models", "get", "r1seg3d-phi3"]) == 1
    error = error_line(capsys)
    assert "checksum mismatch" in error and "model.safetensors" in error
    assert not (tmp_path / "cache" / "models" / "r1seg3d-phi3").exists()
    assert not list((tmp_path / "cache" / "downloads").rglob("model.safetensors"))
    assert r1seg(["ask", "ct.nii.gz", "q", "--model", "r1seg3d-phi3"]) == 2
    assert "not installed" in capsys.readouterr().err


@pytest.mark.parametrize("failure, expected", [
    ("offline", "HF_HUB_OFFLINE is set"),
    ("unreachable", "cannot reach http://127.0.0.1:"),
    ("lost-revision", "has no such revision"),
    ("disk-full", "not enough disk space"),
])
def test_each_failure_is_one_clear_message(hub, monkeypatch, capsys, failure, expected):
    name = "r1seg3d-phi3"
    if failure == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif failure == "unreachable":
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
        closed.close()
    elif failure == "lost-revision":
        name = "lost-revision"
    else:
        hub.declared_size["model.safetensors"] = shutil.disk_usage("/").total * 4
    assert r1seg(["models", "get", name]) == 1
    assert expected in error_line(capsys)


@pytest.mark.parametrize("argv", [["ask", "ct.nii.gz", "q"], ["evaluate"], ["serve"], ["batch", "--input", "x", "--out", "y"],
                                  ["info"]])
def test_every_command_taking_a_model_resolves_names_the_same_way(hub, capsys, argv):
    model = ["r1seg3d-phi3"] if argv == ["info"] else ["--model", "r1seg3d-phi3"]
    assert r1seg([*argv, *model]) == 2
    assert "r1seg models get r1seg3d-phi3" in error_line(capsys)


def test_listing_the_models_needs_no_torch():
    """Slicer's own process reads the list and each model's installed state; importing torch there is what the
    panel must never do (it would load a second, possibly incompatible torch into Slicer)."""
    import subprocess
    import sys

    probe = ("import sys; from r1seg_core.registry.command import models_json; "     # what the panel calls
             "print(sorted(m['name'] for m in models_json()['models'] if m['installed']), 'torch' in sys.modules)")
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout
    assert output.strip().endswith("False"), output
    assert "'default'" in output
