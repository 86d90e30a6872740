"""The command line as a user meets it: a conversation kept in a file (`r1seg ask --conversation`), an interactive
`r1seg chat` driven through a pseudo-terminal, quiet output, and no import cycle between the CLI and the server.

A small untrained model on a coarse grid answers on the bundled sample CT (a few seconds per answer on a CPU)."""
from __future__ import annotations

import ast
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from r1seg_core import sample_ct_path
from r1seg_core.cli import main as r1seg
from r1seg_core.inference import Conversation

from test_inference import small_model

REPO = Path(__file__).resolve().parents[1]
needs_conversation_files = pytest.mark.skipif(not hasattr(Conversation, "save"),
                                              reason="Conversation.save/load (the inference package's) not there yet")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The small model, its card marked untrained: every load then prints the placeholder note once."""
    folder = small_model().save_pretrained(tmp_path_factory.mktemp("model") / "small")
    config = json.loads((folder / "config.json").read_text())
    config["card"]["untrained"] = True
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory) -> str:
    """The sample CT's upper abdomen (a few windows of the small model), and the CT the tests ask about."""
    path = tmp_path_factory.mktemp("ct") / "abdomen.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(sample_ct_path()))[20:84, 20:84, 70:110], str(path))
    return str(path)


def voxels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ---- structure --------------------------------------------------------------------------------------------------

def imported_modules(path: Path) -> set[str]:
    """Absolute names of the r1seg_core modules a file imports, at any depth of the file."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("r1seg_core")}


def test_the_server_never_imports_the_command_line_and_printing_an_answer_imports_neither():
    server = sorted((REPO / "r1seg_core" / "server").glob("*.py"))
    for path in server:
        assert not {m for m in imported_modules(path) if m.startswith("r1seg_core.cli")}, path.name
    printing = imported_modules(REPO / "r1seg_core" / "answer_output.py")
    assert not {m for m in printing if m.startswith(("r1seg_core.cli", "r1seg_core.server"))}
    for path in (REPO / "r1seg_core" / "server" / "client.py", REPO / "r1seg_core" / "cli.py"):
        assert "r1seg_core.answer_output" in imported_modules(path), path.name


# ---- r1seg ask: refusals before the model loads, quiet output --------------------------------------------------

def test_bad_input_is_refused_before_the_model_loads(tmp_path, capsys):
    ct = str(sample_ct_path())
    missing_model = tmp_path / "no-model"                 # a folder without weights: loading it would exit 3, not 2
    missing_model.mkdir()
    missing_model = str(missing_model)
    assert r1seg(["ask", ct, "segment the liver", "-o", str(tmp_path / "liver.png"), "--model", missing_model]) == 2
    assert "unsupported label map format" in capsys.readouterr().err
    assert r1seg(["ask", ct, "   ", "--model", missing_model]) == 2
    assert "the question is empty" in capsys.readouterr().err
    assert r1seg(["ask", str(tmp_path / "missing.nii.gz"), "segment the liver", "--model", missing_model]) == 2
    assert r1seg(["ask", ct, "segment the liver", "-o", str(tmp_path / "none" / "a.seg.nrrd"), "--model",
                  missing_model]) == 2
    assert "mkdir -p" in capsys.readouterr().err


def test_ask_prints_one_progress_bar_no_warnings_and_paths_as_typed(model_dir, small_ct, tmp_path):
    (tmp_path / "out").mkdir()
    child = subprocess.run([sys.executable, "-W", "default", "-m", "r1seg_core.cli", "ask", small_ct,
                            "segment the liver", "-o", "out/liver.seg.nrrd", "--json", "out/liver.json", "--model",
                            str(model_dir), "--device", "cpu"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=900,
                           env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"})
    assert child.returncode == 0, child.stderr
    assert "wrote out/liver.seg.nrrd" in child.stdout and "wrote out/liver.json" in child.stdout
    assert str(tmp_path) not in child.stdout + child.stderr, "paths are shown relative to the working folder"
    assert "Warning" not in child.stderr, child.stderr
    bars = {match.group(1) for match in re.finditer(r"(\w[\w ]*?):\s+\d+%\|", child.stderr)}
    assert bars == {"windows"}, child.stderr
    # The bar is drawn only after its first interval, so it never shows a rate over a zero-second start.
    rates = [float(rate) for rate in re.findall(r"([\d.]+)window/s", child.stderr)]
    assert all(rate < 1000 for rate in rates), f"an impossible rate: {rates}"


def test_the_progress_bar_never_shows_a_rate_over_a_zero_second_start():
    import io

    from r1seg_core.answer_output import progress_bar

    stream = io.StringIO()
    update = progress_bar(stream)
    update(4, 44, "windows")                 # the first report comes after the first batch, at once
    update(8, 44, "windows")
    time.sleep(0.6)
    update(12, 44, "windows")
    update(44, 44, "windows")
    shown = stream.getvalue()
    rates = [float(rate) for rate in re.findall(r"([\d.]+)window/s", shown)]
    assert "12/44" in shown and rates and all(rate < 1000 for rate in rates), shown


# ---- r1seg ask --conversation -------------------------------------------------------------------------------------

@needs_conversation_files
def test_a_follow_up_from_the_command_line_reuses_the_previous_mask_byte_for_byte(model_dir, small_ct, tmp_path,
                                                                                 capsys):
    ct = small_ct
    chat, first, second = tmp_path / "chat.json", tmp_path / "first.seg.nrrd", tmp_path / "second.seg.nrrd"
    common = ["--model", str(model_dir), "--device", "cpu", "--conversation", str(chat)]
    assert r1seg(["ask", ct, "segment the liver", "-o", str(first), "--json", str(tmp_path / "first.json"), *common]) == 0
    saved = json.loads(chat.read_text())
    assert [turn["question"] for turn in saved["turns"]] == ["Segment the liver."]
    assert saved["fingerprint"]
    assert r1seg(["ask", ct, "how big is it?", "-o", str(second), "--json", str(tmp_path / "second.json"), *common]) == 0
    answer = json.loads((tmp_path / "second.json").read_text())
    assert answer["answered_from"] == "conversation"
    assert [t["name"] for t in answer["targets"]] == ["liver"]
    assert voxels(second).tobytes() == voxels(first).tobytes()
    assert len(json.loads(chat.read_text())["turns"]) == 2
    capsys.readouterr()

    # Another CT (the sample cropped) with the same file: a new conversation, said so.
    image = sitk.ReadImage(ct)
    other = tmp_path / "other.nii.gz"
    sitk.WriteImage(image[:, :, : image.GetSize()[2] // 2], str(other))   # the same CT, half of it
    assert r1seg(["ask", str(other), "segment the spleen", *common]) == 0
    assert "about another CT" in capsys.readouterr().err
    assert [turn["question"] for turn in json.loads(chat.read_text())["turns"]] == ["Segment the spleen."]


def test_a_damaged_conversation_file_is_refused_with_the_fix(model_dir, small_ct, tmp_path, capsys):
    chat = tmp_path / "chat.json"
    chat.write_text("[1, 2")
    assert r1seg(["ask", small_ct, "segment the liver", "--conversation", str(chat), "--model",
                  str(model_dir), "--device", "cpu"]) == 2
    assert "new file name" in capsys.readouterr().err
    assert chat.read_text() == "[1, 2", "a refused file is left as it was"


# ---- r1seg chat --------------------------------------------------------------------------------------------------

class Terminal:
    """A child process on a pseudo-terminal, read until an expected text appears (a minimal pexpect)."""

    def __init__(self, command, cwd):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(command, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                        env={**os.environ, "PYTHONPATH": str(REPO), "TERM": "dumb"})
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, timeout: float = 900) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"{text!r} did not appear; the terminal shows:\n{self.seen[-3000:]}")
            try:
                chunk = os.read(self.master, 65536).decode(errors="replace")
            except OSError:           # the child closed the terminal
                chunk = ""
            if not chunk:
                raise AssertionError(f"the session ended before {text!r}:\n{self.seen[-3000:]}")
            self.seen += chunk
        found, self.seen = self.seen.partition(text)[0] + text, self.seen.partition(text)[2]
        return found

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.process.wait(timeout=60)
        finally:
            os.close(self.master)


@needs_conversation_files
def test_chat_in_a_terminal_loads_once_keeps_history_and_writes_each_answer(model_dir, small_ct, tmp_path):
    terminal = Terminal([sys.executable, "-m", "r1seg_core.cli", "chat", small_ct, "--model",
                         str(model_dir), "--device", "cpu", "--out", "answers"], cwd=tmp_path)
    try:
        banner = terminal.expect("> ")
        assert "UNTRAINED PLACEHOLDER" in banner and "answers/" in banner
        terminal.send("segment the liver")
        first = terminal.expect("> ")
        assert "wrote answers/01-liver.seg.nrrd" in first
        assert (tmp_path / "answers" / "01-liver.seg.nrrd").is_file(), "written as the answer comes"
        terminal.send("")                                      # a blank line asks nothing (a new prompt)
        terminal.send("how big is it?")
        second = terminal.expect("wrote answers/02")
        terminal.expect("> ")
        terminal.send("/history")
        history = terminal.expect("> ")
        assert "1. Segment the liver." in history and "2. How big is it?" in history
        terminal.send("/quit")
        assert terminal.close() == 0
    finally:
        if terminal.process.poll() is None:
            terminal.process.kill()
    assert "PLACEHOLDER" not in first + second + history, "the model loaded once"
    saved = json.loads((tmp_path / "answers" / "conversation.json").read_text())
    assert [turn["question"] for turn in saved["turns"]] == ["Segment the liver.", "How big is it?"]
    written = sorted(p.name for p in (tmp_path / "answers").glob("0*"))
    assert written[:2] == ["01-liver.seg.nrrd", "01.json"] and "02.json" in written


def test_ci_runs_exactly_the_test_command_readme_gives_a_user():
    readme = (REPO / "README.md").read_text()
    blocks = [block.split("```", 1)[0].strip() for block in readme.split("```bash\n")[1:]]
    assert blocks[1] in (REPO / ".ci" / "run").read_text().splitlines()
