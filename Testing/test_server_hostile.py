"""Hostile and clumsy clients against a real `r1seg serve` on the loopback interface (reviews/2026-12-07/server.md).

Every attack is answered with a JSON 4xx within seconds, the server's memory stays bounded (its RSS and peak RSS
are read from /proc) and it keeps answering. Raw sockets send what no well-behaved client would. Every loop has
a fixed count and a deadline. The server runs a tiny untrained model with small limits, so that each limit can
be reached cheaply: uploads 16 MiB, decoded CTs 24 MiB, request timeout 2 s, masks kept 4 s.
"""
import gzip
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the serve extra (pip install -e .[serve])")
pytest.importorskip("uvicorn", reason="needs the serve extra (pip install -e .[serve])")

from test_server import QUESTION, SERVER_ENV, START_TIMEOUT_S, LocalServer, rss_mb, start_server, wait  # noqa: E402
from test_server import model_dir  # noqa: E402,F401  (the fixture: the same tiny model)

import r1seg_core  # noqa: E402
from r1seg_core import sample_ct_path  # noqa: E402
from r1seg_core.cli import main as r1seg  # noqa: E402
from r1seg_core.server import protocol  # noqa: E402
from r1seg_core.server.client import Client, ServerError, ServerUnreachable  # noqa: E402
from r1seg_core.server.nrrd import volume_to_nrrd_bytes  # noqa: E402
from r1seg_core.errors import InvalidInputError  # noqa: E402
from r1seg_core.volume import Volume, read_volume, validate_ct  # noqa: E402

MAX_UPLOAD_MB, MAX_CT_MB, TIMEOUT_S, KEEP_RESULTS_S = 16, 24, 2, 4
# An attack is refused within this many seconds (on a shared 2-core machine).
PROMPT_S = 5.0
FAST = {"sliding_window": False, "global_step": "off"}   # one window: a question in well under a second


@pytest.fixture(scope="module")
def server(model_dir):
    server = start_server(model_dir, "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-ct-mb", str(MAX_CT_MB),
                          "--request-timeout", str(TIMEOUT_S), "--keep-results-s", str(KEEP_RESULTS_S))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def alive(server):
    """Each attack ends with the server still answering."""
    yield server
    assert server.client.health()["status"] == "ok", server.log_tail()


def port_of(server) -> int:
    return int(server.client.url.rsplit(":", 1)[1])


def http_bytes(server, method, path, body=b"", headers=(), token=True, content_type=None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port_of(server)}", "Connection: close"]
    if token:
        lines.append(f"Authorization: Bearer {server.client.token}")
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if method in ("POST", "PUT", "PATCH") and not any(h.lower().startswith(("content-length", "transfer-encoding"))
                                                      for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    lines += list(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def exchange(server, data: bytes, timeout: float = 15.0):
    """Send raw bytes, read until the server closes: (status, JSON body or None, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:        # the server answered and closed before reading everything (413)
            pass
        reply = b""
        try:
            while chunk := sock.recv(1 << 16):
                reply += chunk
        except OSError:
            pass
    return (*parse_reply(reply), time.monotonic() - started)


def parse_reply(reply: bytes):
    if not reply:
        return None, None
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), reply[:300]
    return status, json.loads(body)


def assert_refused(result, status, phrase):
    code, reply, seconds = result
    assert code == status, (code, reply)
    assert reply["error"] and phrase in reply["detail"], reply
    assert seconds < PROMPT_S, f"refused after {seconds:.1f} s"


# ---- NRRD bodies -----------------------------------------------------------------------------------------------

def nrrd(fields: str, payload: bytes = b"\0" * 64, newline: str = "\n") -> bytes:
    header = "NRRD0004\n" + fields.strip() + "\n"
    return header.replace("\n", newline).encode("latin-1") + newline.encode() + payload


def header(sizes="4 4 4", type="short", encoding="raw", extra="") -> str:
    return f"type: {type}\ndimension: {len(sizes.split())}\nsizes: {sizes}\nspacings: {' '.join(['1'] * len(sizes.split()))}\n" \
           f"endian: little\nencoding: {encoding}\n{extra}"


def gzip_of(size: int) -> bytes:
    """`size` zero bytes, gzip-compressed in steps (a bomb of about 1000:1)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    step = bytes(1 << 24)
    parts = [compressor.compress(step[:min(len(step), size - done)]) for done in range(0, size, len(step))]
    return b"".join(parts) + compressor.flush()


def ct_volume(seed: int, shape=(24, 32, 40), spacing=(1.5, 1.5, 3.0)) -> Volume:
    """A small CT-like volume (air around a body of soft tissue); each seed gives other voxels."""
    rng = np.random.default_rng(seed)
    array = np.full(shape, -1000, np.int16)
    z, y, x = (slice(n // 4, 3 * n // 4) for n in shape)
    array[z, y, x] = rng.integers(-100, 200, size=array[z, y, x].shape)
    return Volume(array, spacing, (0.0, 0.0, 0.0), np.eye(3))


UPLOAD_ATTACKS = {
    # Declared sizes far beyond the decoded-CT limit: refused from the header, nothing allocated.
    "raw 2 KB declaring 1 GiB": (nrrd(header("1024 1024 512"), bytes(2000)), 413, "--max-ct-mb"),
    "gzip 132 bytes declaring 2 GiB": (nrrd(header("1024 1024 1024", encoding="gzip"), gzip.compress(bytes(1000))), 413, "--max-ct-mb"),
    "raw declaring 16 GiB": (nrrd(header("2048 2048 2048")), 413, "--max-ct-mb"),
    "declaring 10^36 voxels": (nrrd(header("1000000000000 1000000000000 1000000000000")), 413, "--max-ct-mb"),
    "gzip bomb declaring 512 MiB": (nrrd(header("512 512 1024", encoding="gzip"), gzip_of(32 << 20)), 413, "--max-ct-mb"),
    "4D declaring 64 MiB": (nrrd(header("256 256 256 4", type="uchar")), 413, "--max-ct-mb"),
    # A bomb inside the declared size, or a stream that does not match it: stopped while inflating.
    "gzip inflating past its declared 512 KiB": (nrrd(header("64 64 64", encoding="gzip"), gzip_of(128 << 20)), 400, "inflate to more"),
    "gzip cut in half": (nrrd(header("64 64 64", encoding="gzip"), gzip_of(1 << 19)[:200]), 400, "truncated"),
    "gzip stream of garbage": (nrrd(header("8 8 8", encoding="gzip"), b"\x1f\x8b\x08\x00" + os.urandom(400)), 400, "gzip data"),
    "zlib payload shorter than declared": (nrrd(header("64 64 64", encoding="gzip"), zlib.compress(bytes(1000))), 400, "truncated"),
    # Extent: a small CT read at a wrong spacing would ask for a huge resampled grid.
    "256^3 at 10 mm spacing": (nrrd(header("256 256 200", type="uchar").replace("spacings: 1 1 1", "spacings: 10 10 10")), 400, "spacing of 10 x 10 x 10 mm"),
    "space directions of 10 mm": (nrrd(header("256 256 200", type="uchar").replace("spacings: 1 1 1", "space: left-posterior-superior\nspace directions: (10,0,0) (0,10,0) (0,0,10)")), 400, "span 2560 x 2560 x 2000 mm"),
    # Spacing and geometry that a reader would misread.
    "nan spacings": (nrrd(header().replace("spacings: 1 1 1", "spacings: nan nan nan")), 400, "not all finite"),
    "nan space directions": (nrrd(header().replace("spacings: 1 1 1", "space: left-posterior-superior\nspace directions: (nan,0,0) (0,1,0) (0,0,1)")), 400, "not all finite"),
    "infinite space origin": (nrrd(header(extra="space origin: (inf,0,0)\n")), 400, "not all finite"),
    "zero spacing": (nrrd(header().replace("spacings: 1 1 1", "spacings: 0 0 0")), 400, "spacing"),
    "sizes with a zero": (nrrd(header("0 4 4")), 400, "at least 1"),
    "negative sizes": (nrrd(header("-4 4 4")), 400, "at least 1"),
    "sizes that are not numbers": (nrrd(header("4 four 4")), 400, "whole numbers"),
    "sizes twice": (nrrd(header(extra="sizes: 8 8 8\n")), 400, "twice"),
    "type block": (nrrd(header(type="block")), 400, "not a voxel type"),
    "encoding bzip2": (nrrd(header(encoding="bzip2")), 400, "raw or gzip"),
    "encoding ascii": (nrrd(header(encoding="ascii"), b"1 2 3 " * 30), 400, "raw or gzip"),
    "byte skip -1": (nrrd(header(extra="byte skip: -1\n")), 400, "byte skip"),
    "no type field": (nrrd("dimension: 3\nsizes: 4 4 4\nencoding: raw"), 400, "no 'type'"),
    # Files the reader would open, and things that are not NRRD at all.
    "data file /etc/passwd": (nrrd(header(extra="data file: /etc/passwd\n")), 400, "separate data file"),
    "DATA FILE upper case, CRLF": (nrrd(header(extra="DATA FILE: ../../etc/passwd\n"), newline="\r\n"), 400, "separate data file"),
    "datafile LIST": (nrrd(header(extra="datafile: LIST\n"), b"/etc/passwd\n"), 400, "separate data file"),
    "pickle": (b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94", 400, "pickle"),
    "PNG": (b"\x89PNG\r\n\x1a\n" + bytes(100), 400, "not a NRRD file"),
    "header without an end": (b"NRRD0004\ntype: short\n" + b"x" * 200, 400, "no end"),
    "70 KB header": (b"NRRD0004\n" + b"# " + b"a" * 70000 + b"\n\n" + bytes(10), 400, "no end"),
    "header and no voxels": (nrrd(header(), b""), 400, "no voxel data"),
    "payload shorter than sizes": (nrrd(header("64 64 64"), bytes(64)), 400, "uploaded"),
    "2D image": (nrrd(header("16 16"), bytes(512)), 400, "2D"),
}


@pytest.mark.parametrize("case", list(UPLOAD_ATTACKS))
def test_hostile_uploads_are_refused_from_the_header(alive, case):
    body, status, phrase = UPLOAD_ATTACKS[case]
    assert_refused(exchange(alive, http_bytes(alive, "POST", "/volumes", body, content_type=protocol.NRRD_TYPE)),
                   status, phrase)


def peak_rss_reset(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")    # resets VmHWM (Linux 4.0+)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_size_bombs_do_not_allocate_what_they_declare(alive):
    """The review's bombs (rows 63-67): 1-2 GiB declared, and 128 MiB inflated from 128 KB; peak RSS barely moves."""
    pid = alive.pid
    peak_rss_reset(pid)
    before = peak_rss_mb(pid)
    for case in ("raw 2 KB declaring 1 GiB", "gzip 132 bytes declaring 2 GiB", "gzip bomb declaring 512 MiB",
                 "gzip inflating past its declared 512 KiB", "256^3 at 10 mm spacing"):
        body, status, _ = UPLOAD_ATTACKS[case]
        assert exchange(alive, http_bytes(alive, "POST", "/volumes", body, content_type=protocol.NRRD_TYPE))[0] == status
    grown = peak_rss_mb(pid) - before
    print(f"peak RSS grew by {grown:.0f} MiB over five bombs")
    assert grown < 64, f"peak RSS grew by {grown:.0f} MiB"


def test_a_ct_at_a_wrong_spacing_is_refused_before_resampling_everywhere():
    """The same rule for `r1seg ask` and training (volume.validate_ct): 5 mm is a plausible spacing, 1280 mm is not."""
    wrong = ct_volume(5, (200, 256, 256), (5.0, 5.0, 5.0))
    with pytest.raises(InvalidInputError, match="at a spacing of 5 x 5 x 5 mm span 1280 x 1280 x 1000 mm"):
        validate_ct(wrong)
    validate_ct(ct_volume(5, (200, 256, 256), (1.5, 1.5, 5.0)))    # 384 x 384 x 1000 mm: a CT


@pytest.mark.parametrize("newline", ["\r\n", "\n"])
@pytest.mark.parametrize("compress", [False, True])
def test_crlf_and_lf_headers_are_read_alike(alive, newline, compress):
    ct = read_volume(sample_ct_path())
    data = volume_to_nrrd_bytes(ct, compress=compress)
    end = data.index(b"\n\n")
    body = data[:end].replace(b"\n", newline.encode()) + (newline * 2).encode() + data[end + 2:]
    status, reply, _ = exchange(alive, http_bytes(alive, "POST", "/volumes", body, content_type=protocol.NRRD_TYPE))
    assert status == 201 and reply["shape"] == list(ct.shape), reply
    assert alive.client.forget_volume(reply["volume_id"])


# ---- the HTTP layer ------------------------------------------------------------------------------------------------

def raw_http(server, text: str) -> bytes:
    return text.replace("PORT", str(port_of(server))).replace("TOKEN", server.client.token).encode("latin-1")


HTTP_ATTACKS = {
    "Content-Length -1": ("POST /jobs HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\nContent-Length: -1\r\n\r\n", 400, "invalid HTTP request"),
    "Content-Length 1e3": ("POST /jobs HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\nContent-Length: 1e3\r\n\r\n", 400, "invalid HTTP request"),
    "HTTP/1.1 without Host": ("GET /health HTTP/1.1\r\nAuthorization: Bearer TOKEN\r\n\r\n", 400, "invalid HTTP request"),
    "two Host headers": ("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.com\r\n\r\n", 400, "invalid HTTP request"),
    "200 KB header": ("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + "a" * 200_000 + "\r\n\r\n", 400, "invalid HTTP request"),
    "garbage request line": ("HELLO THERE\r\n\r\n", 400, "invalid HTTP request"),
    "no token": ("GET /health HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\nConnection: close\r\n\r\n", 401, "token"),
    "foreign Host": ("GET /health HTTP/1.1\r\nHost: evil.com\r\nAuthorization: Bearer TOKEN\r\nConnection: close\r\n\r\n", 403, "loopback"),
    "Origin header": ("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://evil.example\r\nAuthorization: Bearer TOKEN\r\nConnection: close\r\n\r\n", 403, "web pages"),
    "PUT on /jobs": ("PUT /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer TOKEN\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 405, "not allowed"),
    "unknown path": ("GET /etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer TOKEN\r\nConnection: close\r\n\r\n", 404, "no such endpoint"),
    "Content-Length 10^15 upload": ("POST /volumes HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer TOKEN\r\nContent-Type: application/octet-stream\r\nContent-Length: 999999999999999\r\nConnection: close\r\n\r\nNRRD0004\n", 413, "--max-upload-mb"),
    "form post as text/plain": ("POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer TOKEN\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}", 415, "Content-Type"),
    "old protocol version": ("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer TOKEN\r\nX-R1Seg3D-API: 1\r\nConnection: close\r\n\r\n", 409, "client protocol 1, server protocol 2"),
}


@pytest.mark.parametrize("case", list(HTTP_ATTACKS))
def test_http_layer_errors_are_json(alive, case):
    text, status, phrase = HTTP_ATTACKS[case]
    assert_refused(exchange(alive, raw_http(alive, text)), status, phrase)


def test_a_chunked_upload_over_the_limit_gets_413(alive):
    head = raw_http(alive, "POST /volumes HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer TOKEN\r\n"
                           "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    chunk = b"%x\r\n" % (1 << 20) + bytes(1 << 20) + b"\r\n"
    assert_refused(exchange(alive, head + chunk * (MAX_UPLOAD_MB + 2) + b"0\r\n\r\n"), 413, "limit")


# ---- questions ------------------------------------------------------------------------------------------------------

def job_body(**fields) -> bytes:
    return json.dumps({"volume_id": "0" * 64, "question": QUESTION, **fields}).encode()


JOB_ATTACKS = {
    "overlap 0.99": (job_body(overlap=0.99), 400, "overlap must be between 0.0 and 0.75"),
    "overlap NaN": (b'{"volume_id": "' + b"0" * 64 + b'", "question": "x", "overlap": NaN}', 400, "overlap must be between"),
    "overlap -Infinity": (b'{"volume_id": "' + b"0" * 64 + b'", "question": "x", "overlap": -Infinity}', 400, "overlap must be between"),
    "window_batch 1000000": (job_body(window_batch=1_000_000), 400, "window_batch must be between 1 and 32"),
    "window_batch 0": (job_body(window_batch=0), 400, "window_batch must be between 1 and 32"),
    "seed 10^30": (job_body(answer_mode="sample", seed=10 ** 30), 400, "seed must be between 0 and 4294967295"),
    "seed -1": (job_body(seed=-1), 400, "seed must be between"),
    "loops 9": (job_body(loops=9), 400, "loops must be between 0 and 3"),
    "loops as a string": (job_body(loops="3"), 422, "loops"),
    "sliding_window as a string": (job_body(sliding_window="yes"), 422, "sliding_window"),
    "60000 nested lists": (b"[" * 60000, 400, "nested too deeply"),
    "10000 nested objects": (b'{"a":' * 10000 + b"1" + b"}" * 10000, 400, "nested too deeply"),
    "1800-character question": (job_body(question="liver " * 300), 400, "limit is 1000"),
    "100k-character question": (job_body(question="a" * 100_000), 413, "limit"),
    "the model's own tokens": (job_body(question="segment [SEG] <image>"), 400, "own tokens"),
    "an extra field": (job_body(model="/etc/passwd"), 422, "Extra inputs"),
    "a list body": (b"[1, 2]", 400, "JSON object"),
    "unknown CT": (job_body(), 404, "upload it first"),
}


@pytest.mark.parametrize("case", list(JOB_ATTACKS))
def test_question_values_are_checked_when_submitted(alive, case):
    body, status, phrase = JOB_ATTACKS[case]
    assert_refused(exchange(alive, http_bytes(alive, "POST", "/jobs", body, content_type=protocol.JSON_TYPE)),
                   status, phrase)


def test_job_ids_are_random_and_belong_to_their_client(alive):
    owner = alive.client
    other = Client(owner.url, owner.token, client_id="another-client")
    volume_id = owner.upload(volume_to_nrrd_bytes(ct_volume(1)))
    jobs = [owner.submit(volume_id, QUESTION, **FAST)["job_id"] for _ in range(2)]
    assert all(re.fullmatch(r"j[0-9a-f]{32}", job) for job in jobs) and jobs[0] != jobs[1]
    for job in jobs:
        assert wait(owner, job)["state"] == protocol.DONE
    job = jobs[0]
    calls = {"status": lambda: other.status(job), "result": lambda: other.result(job), "cancel": lambda: other.cancel(job),
             "mask": lambda: other.mask(job, 0), "labelmap": lambda: other.labelmap(job, "nrrd"),
             "events": lambda: other.request("GET", f"/jobs/{job}/events"), "sequential id": lambda: other.status("j1")}
    for name, call in calls.items():
        with pytest.raises(ServerError) as refused:
            call()
        assert refused.value.status == 404, name
    # Without the client header (curl), the job does not exist either.
    status, reply, _ = exchange(alive, http_bytes(alive, "GET", f"/jobs/{job}"))
    assert status == 404 and reply["error"] == protocol.ERROR_NOT_FOUND
    assert owner.status(job)["state"] == protocol.DONE and owner.result(job)["targets"]


def test_finished_jobs_let_go_of_their_masks_once_fetched_or_expired(alive):
    client = alive.client
    volume_id = client.upload(volume_to_nrrd_bytes(ct_volume(2)))
    jobs = [client.submit(volume_id, QUESTION, **FAST)["job_id"] for _ in range(3)]
    for job in jobs:
        assert wait(client, job)["state"] == protocol.DONE
    by_labelmap, by_masks, unfetched = jobs
    client.labelmap(by_labelmap, "nrrd")
    for index in range(len(client.result(by_masks)["targets"])):
        client.mask(by_masks, index)
    for job in (by_labelmap, by_masks):
        with pytest.raises(ServerError, match="released") as released:
            client.mask(job, 0)
        assert released.value.status == 410
        assert client.result(job)["answer"]     # the answer's text and numbers stay
    time.sleep(KEEP_RESULTS_S + 0.5)
    with pytest.raises(ServerError, match="released"):
        client.labelmap(unfetched, "nrrd")
    assert client.result(unfetched)["answer"]


def test_memory_stays_bounded_by_the_stored_cts_not_the_finished_jobs(alive):
    """16 distinct CTs of 15 MiB, one question each, answers fetched. The server keeps 4 CTs and the finished jobs
    hold none (review row 88: +1.9 GiB with 128 MiB CTs, 768 MiB of it held by evicted CTs' finished jobs), so once 4
    CTs are stored its RSS has a floor that stays put. The floor is the least RSS after 4 consecutive questions: what
    is freed after a question ends (its fetched masks, the labelmap's encoding) stays resident until the next one
    ends (server/memory.py), which only ever adds.

    Measured on the 2-core machine: alone, the floor is flat from the 4th CT on. In a full suite run it once stepped
    up by 15 MiB between CTs 6 and 7 and then stayed flat: a one-time cost. A leak rises at every step instead, so the
    floors of CTs 5-8, 9-12 and 13-16 are compared, and the test fails only when both steps rise by 12 MiB or more.
    While the stored CTs lay in malloc's heap the floor rose by 24 to 56 MiB over 5 questions (about 5 to 11 MiB a
    question: free heap memory, not live arrays; server/memory.py), and 8 kept CTs would add 120 MiB. The bound,
    12 MiB over the 4 questions between two groups' first CTs, is below the smallest such rise (19 MiB over 4)."""
    client = alive.client
    shape = (120, 256, 256)                      # 15 MiB of int16
    uploads = [volume_to_nrrd_bytes(ct_volume(100 + k, shape, (1.0, 1.0, 1.0))) for k in range(16)]
    volume_ids, rss = [], []
    for data in uploads:
        volume_ids.append(client.upload(data))
        job = client.submit(volume_ids[-1], QUESTION, **FAST)["job_id"]
        assert wait(client, job, timeout=60)["state"] == protocol.DONE
        client.labelmap(job, "nrrd")
        rss.append(rss_mb(alive.pid))
    floors = [min(rss[first:first + 4]) for first in (4, 8, 12)]
    print("server RSS after each CT (MiB):", " ".join(f"{value:.0f}" for value in rss))
    rises = [later - earlier for earlier, later in zip(floors, floors[1:])]
    assert min(rises) < 12, f"the RSS floor grew at each step, by {rises[0]:.0f} then {rises[1]:.0f} MiB: {rss}"
    for volume_id in volume_ids:
        client.forget_volume(volume_id)


def test_concurrent_uploads_are_decoded_two_at_a_time(alive):
    """6 uploads of 15 MiB at once (review row 87: nothing limited them); peak RSS stays near two decodes."""
    client = alive.client
    uploads = [volume_to_nrrd_bytes(ct_volume(200 + k, (120, 256, 256), (1.0, 1.0, 1.0))) for k in range(6)]
    peak_rss_reset(alive.pid)
    before = peak_rss_mb(alive.pid)
    results = []

    def send(data):
        results.append(exchange(alive, http_bytes(alive, "POST", "/volumes", data, content_type=protocol.NRRD_TYPE), 60)[0])

    threads = [threading.Thread(target=send, args=(data,)) for data in uploads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [201] * 6
    grown = peak_rss_mb(alive.pid) - before
    print(f"peak RSS +{grown:.0f} MiB for 6 concurrent 15 MiB uploads")
    # Each decode holds its body, the decoded image and its array (3 x 15 MiB), and the store keeps 4 CTs.
    assert grown < 200, f"peak RSS grew by {grown:.0f} MiB"
    for data in uploads:
        client.forget_volume(protocol.volume_id(data))


def test_an_idle_server_takes_three_questions_back_to_back(alive):
    """Review row 75: the first question still sat in the queue, so an idle server answered the third 'busy'."""
    client = alive.client
    volume_id = client.upload(volume_to_nrrd_bytes(read_volume(sample_ct_path())))
    slow = {"overlap": 0.75, "window_batch": 1}     # hundreds of windows: the first question is still running
    for _ in range(5):
        replies = []
        for _ in range(3):
            try:
                replies.append(client.submit(volume_id, QUESTION, **slow)["job_id"])
            except ServerError as error:
                replies.append(error)
        assert all(isinstance(reply, str) for reply in replies), replies
        with pytest.raises(ServerError, match="busy") as busy:    # a fourth is one too many
            client.submit(volume_id, QUESTION, **slow)
        assert busy.value.status == 429
        for job in reversed(replies):
            client.cancel(job)
        for job in replies:
            assert wait(client, job, timeout=10)["state"] == protocol.CANCELLED


# ---- slow and vanishing clients ------------------------------------------------------------------------------------

def wait_closed(sock, deadline: float) -> bytes:
    """Read until the server closes the connection or the deadline passes (then the connection is still open)."""
    reply = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(1 << 16)
        except socket.timeout:
            break
        except OSError:
            return reply
        if not chunk:
            return reply
        reply += chunk
    raise AssertionError("the server kept the connection open")


def test_idle_and_unfinished_requests_are_closed_after_the_timeout(alive):
    port = port_of(alive)
    started = time.monotonic()
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
    try:
        for index, sock in enumerate(sockets[1:]):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * index)
        assert alive.client.health()["status"] == "ok"      # served meanwhile
        for sock in sockets:
            status, reply = parse_reply(wait_closed(sock, started + TIMEOUT_S * 1.25 + 2))
            assert status == 408 and reply["error"] == protocol.ERROR_TIMEOUT, reply
    finally:
        for sock in sockets:
            sock.close()
    assert time.monotonic() - started < TIMEOUT_S * 1.25 + 2


def test_a_trickled_header_or_body_is_closed(alive):
    port = port_of(alive)
    for request in (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                    http_bytes(alive, "POST", "/volumes", headers=["Content-Length: 1000000"],
                               content_type=protocol.NRRD_TYPE) + b"NRRD0004\n"):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request)
            started = time.monotonic()
            closed = False
            for _ in range(int(4 * TIMEOUT_S / 0.25)):        # one byte every 0.25 s, for at most 4 timeouts
                try:
                    sock.sendall(b"a")
                except OSError:
                    closed = True
                    break
                time.sleep(0.25)
                sock.setblocking(False)
                try:
                    if sock.recv(1 << 16) is not None:
                        closed = True
                        break
                except BlockingIOError:
                    pass
                except OSError:
                    closed = True
                    break
                finally:
                    sock.setblocking(True)
            assert closed, f"still open after {time.monotonic() - started:.1f} s"
            assert time.monotonic() - started < TIMEOUT_S * 1.25 + 1.5


def server_log(server) -> str:
    return server.log_tail(100_000)


def test_a_client_hanging_up_is_one_log_line(alive):
    before = server_log(alive)
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", port_of(alive))) as sock:
            sock.sendall(http_bytes(alive, "POST", "/conversations", headers=["Content-Length: 100"],
                                    content_type=protocol.JSON_TYPE) + b"{")
    deadline = time.monotonic() + 5
    while server_log(alive).count("hung up") - before.count("hung up") < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    added = server_log(alive)[len(before):]
    assert "Traceback" not in added, added
    about_them = [line for line in added.splitlines() if "/conversations" in line]
    assert len(about_them) == 10 and all("hung up" in line for line in about_them), added


# ---- clients ----------------------------------------------------------------------------------------------------------

def test_the_client_names_an_upload_limit_instead_of_an_unreachable_server(alive, tmp_path, capsys):
    """Review row 82: a CT over --max-upload-mb was reported as 'cannot reach the server'."""
    big = ct_volume(4, (136, 256, 256), (1.0, 1.0, 1.0))     # 17 MiB of int16, over the 16 MiB upload limit
    data = volume_to_nrrd_bytes(big)
    with pytest.raises(ServerError, match="--max-upload-mb") as refused:
        alive.client.upload(data)
    assert refused.value.status == 413 and not isinstance(refused.value, ServerUnreachable)
    # A server that does not advertise its limits: the client still tells a refusal from an unreachable server.
    unadvertised = Client(alive.client.url, alive.client.token)
    unadvertised._server_info = {"api": protocol.API_VERSION}
    with pytest.raises(ServerError) as refused:
        unadvertised.upload(data)
    assert refused.value.status == 413 and not isinstance(refused.value, ServerUnreachable), refused.value
    # Decoded over --max-ct-mb while small on the wire.
    huge = volume_to_nrrd_bytes(Volume(np.full((200, 256, 256), -1000, np.int16), (1.0, 1.0, 1.0), (0.0,) * 3, np.eye(3)),
                                compress=True)
    with pytest.raises(ServerError, match="--max-ct-mb") as refused:
        alive.client.upload(huge)
    assert refused.value.status == 413
    # The command line says the same.
    token_file = tmp_path / "token"
    token_file.write_text(alive.client.token)
    token_file.chmod(0o600)
    path = tmp_path / "big.nrrd"
    path.write_bytes(data)
    assert r1seg(["ask", str(path), QUESTION, "--server", alive.client.url, "--token-file", str(token_file)]) == 1
    error = capsys.readouterr().err
    assert "accepts uploads up to 16 MiB" in error and "cannot reach" not in error, error


class _OldServer(http.server.BaseHTTPRequestHandler):
    health = {}

    def do_GET(self):
        body = json.dumps(self.health).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("health, expected", [
    ({"status": "ok", "version": "0.0.9"}, "no protocol version"),
    ({"status": "ok", "version": "9.0.0", "api": 3}, "speaks protocol 3 (r1seg3d 9.0.0)"),
])
def test_the_client_refuses_a_server_of_another_protocol(health, expected):
    handler = type("Handler", (_OldServer,), {"health": health})
    old = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=old.serve_forever, daemon=True)
    thread.start()
    try:
        client = Client(f"http://127.0.0.1:{old.server_address[1]}")
        with pytest.raises(ServerError, match=re.escape(expected)) as refused:
            client.upload(b"NRRD0004\n")
        message = str(refused.value)
        assert f"protocol {protocol.API_VERSION} (r1seg3d {r1seg_core.__version__})" in message
        assert refused.value.kind == protocol.ERROR_VERSION
    finally:
        old.shutdown()
        old.server_close()
        thread.join(5)


def test_health_carries_the_version_and_a_missing_api_header_is_served(alive):
    status, reply, _ = exchange(alive, http_bytes(alive, "GET", "/health"))
    assert status == 200 and reply["api"] == protocol.API_VERSION == 2 and reply["version"] == r1seg_core.__version__
    assert reply["limits"]["ct_bytes"] == MAX_CT_MB << 20 and reply["limits"]["upload_bytes"] == MAX_UPLOAD_MB << 20
    status, reply, _ = exchange(alive, http_bytes(alive, "GET", "/health", headers=["X-R1Seg3D-API: 2"]))
    assert status == 200
    status, reply, _ = exchange(alive, http_bytes(alive, "GET", "/health", headers=["X-R1Seg3D-API: 3"]))
    assert status == 409 and reply["error"] == "version_mismatch"
    assert (reply["version"], reply["api"]) == (r1seg_core.__version__, 2)
    assert reply["message"].startswith(f"client protocol 3, server protocol 2 (r1seg3d {r1seg_core.__version__}): update")


def test_a_zombie_parent_ends_the_server(model_dir):
    """Review row 90: a parent that ended but was not reaped (no init reaping in a container) kept the server."""
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    server = LocalServer(str(model_dir), device="cpu", threads=1, environment=SERVER_ENV, parent_pid=parent.pid)
    try:
        server.start()
        server.wait_ready(START_TIMEOUT_S)
        parent.kill()                      # not waited for: a zombie until this test reaps it
        ended = time.monotonic()
        while server.running and time.monotonic() - ended < 30:     # 0.5 s polls; a starved machine is slow to exit
            time.sleep(0.1)
        assert not server.running, f"the server outlived its zombie parent by 30 s\n{server.log_tail()}"
        print(f"the server ended {time.monotonic() - ended:.1f} s after its parent became a zombie")
        assert f"parent process {parent.pid} has ended" in server.log_tail()
        assert Path(f"/proc/{parent.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    finally:
        parent.kill()
        parent.wait()
        server.stop()
