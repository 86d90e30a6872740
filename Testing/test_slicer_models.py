"""The panel's model picker (R1Seg3DSlicerLib/model_picker.py, issue 22): the registry's answering models with their
state, size, memory and licence; a download run out of Slicer's process (`r1seg models get NAME --progress-json`)
with progress, cancel and the command's own failure messages.

Against test_registry's Hugging Face Hub on loopback (the same fixture, the tiny compat models in the published
layouts); the expected sizes and licences come from what the hub serves and from the registry file, read here with
json, not from the project's helpers. The processes are real."""
import fnmatch
import json
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "R1Seg3DSlicer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from R1Seg3DSlicerLib import engine, model_picker, process_tree  # noqa: E402
from test_registry import hub  # noqa: E402,F401  (the loopback hub fixture)
from test_slicer_chat import module  # noqa: E402,F401  (the module file with Slicer's Python layer stubbed)

from r1seg_core.cli import main as r1seg  # noqa: E402

DOWNLOAD_TIMEOUT_S = 180.0


def registry_models(tmp_path) -> dict:
    """The test registry the hub fixture wrote, as plain JSON."""
    return {m["name"]: m for m in json.loads((tmp_path / "registry.json").read_text())["models"]}


def run_to_end(download) -> list:
    events, deadline = [], time.monotonic() + DOWNLOAD_TIMEOUT_S
    while not download.ended:
        assert time.monotonic() < deadline, "the download did not end"
        events += download.poll()
        time.sleep(0.05)
    return events


def served_bytes(hub, entry: dict) -> int:
    """What the entry's file patterns select from the repositories the hub serves (safetensors only, no pickles)."""
    total = 0
    for source in entry["sources"]:
        _, files = hub.repos[source["repo"]]
        total += sum(len(data) for name, data in files.items()
                     if any(fnmatch.fnmatch(name, p) for p in source["files"]) and not name.endswith(".bin"))
    return total


def test_picker_lists_the_answering_models_with_state_size_memory_and_licence_verbatim(hub, tmp_path):
    registry = registry_models(tmp_path)
    choices = model_picker.model_choices()
    assert [c.name for c in choices] == [name for name, m in registry.items() if m["answers"]]
    for choice in choices:
        entry = registry[choice.name]
        assert (choice.licence, choice.download, choice.memory) == (entry["licence"], entry["download"], entry["memory"])
        assert choice.installed == bool(entry.get("bundled"))   # a fresh cache: only the bundled model
        details = model_picker.details_text(choice)
        assert entry["licence"] in details and entry["download"] in details and entry["memory"] in details
        no_licence = entry["licence"].startswith("none stated")
        assert ("The authors state no licence" in details) == no_licence
    default = next(c for c in choices if c.bundled)
    phi3 = next(c for c in choices if c.name == "r1seg3d-phi3")
    assert default.folder_setting == "" and phi3.folder_setting is None   # not installed: the setting stays
    assert model_picker.choice_for_folder(choices, "") == default.name
    assert model_picker.choice_for_folder(choices, str(tmp_path)) == model_picker.CUSTOM_FOLDER
    consent = model_picker.consent_text(phi3)
    assert registry["r1seg3d-phi3"]["download"] in consent and registry["r1seg3d-phi3"]["licence"] in consent
    assert "state no licence" in consent


def test_download_asks_consent_then_runs_in_its_own_process_with_progress_and_the_picker_uses_it(module, hub, tmp_path):
    logic = module.R1Seg3DSlicerLogic(session=engine.R1SegSession())
    sam = next(c for c in logic.modelChoices() if c.name == "r1seg3d-sam")
    asked = []
    assert not logic.startModelDownload(sam, lambda text: asked.append(text) or False)   # declined: nothing runs
    assert not logic.downloading and logic.pollDownload() == []
    assert logic.startModelDownload(sam, lambda text: asked.append(text) or True)
    assert asked == [model_picker.consent_text(sam)] * 2 and logic.downloading
    with pytest.raises(RuntimeError, match="already downloading"):
        logic.startModelDownload(sam, lambda text: True)
    download = logic._download
    events = run_to_end(download)
    assert not logic.downloading and not process_tree.pid_running(download._process.pid)
    progress = [e for e in events if isinstance(e, model_picker.DownloadProgress)]
    expected = served_bytes(hub, registry_models(tmp_path)["r1seg3d-sam"])
    assert progress and all(e.total == expected for e in progress)
    assert [e.done for e in progress] == sorted(e.done for e in progress) and progress[-1].done == expected
    folder = tmp_path / "cache" / "models" / "r1seg3d-sam"
    assert events[-1] == model_picker.DownloadFinished(str(folder)) and (folder / "download.json").is_file()

    choices = model_picker.model_choices()
    sam = next(c for c in choices if c.name == "r1seg3d-sam")
    assert sam.installed and sam.folder_setting == str(folder)
    assert model_picker.choice_for_folder(choices, str(folder)) == "r1seg3d-sam"


def test_progress_json_writes_only_json_lines_on_stdout(hub, capsys):
    assert r1seg(["models", "get", "r1seg3d-phi3", "--progress-json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    events = [json.loads(line) for line in lines]   # every line parses
    assert events[-1]["event"] == "installed" and events[-2]["event"] == "progress"
    assert events[-2]["done"] == events[-2]["total"] > 0


@pytest.mark.parametrize("failure, expected", [
    ("offline", "HF_HUB_OFFLINE is set"),
    ("unreachable", "cannot reach http://127.0.0.1:"),
    ("disk-full", "not enough disk space"),
])
def test_a_failed_download_says_the_commands_one_message(hub, monkeypatch, tmp_path, failure, expected):
    if failure == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif failure == "disk-full":
        hub.declared_size["model.safetensors"] = shutil.disk_usage("/").total * 4
    else:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
        closed.close()
    download = model_picker.ModelDownload("r1seg3d-phi3")
    download.start()
    events = run_to_end(download)
    assert isinstance(events[-1], model_picker.DownloadFailed) and expected in events[-1].message
    assert "Traceback" not in events[-1].message
    assert not (tmp_path / "cache" / "models" / "r1seg3d-phi3").exists()


def test_cancel_ends_the_download_process_tree_and_installs_nothing(hub, tmp_path):
    download = model_picker.ModelDownload("r1seg3d-phi3")
    download.start()
    download.cancel()
    events = run_to_end(download)
    assert isinstance(events[-1], model_picker.DownloadCancelled) and "Download resumes it" in events[-1].message
    assert not process_tree.pid_running(download._process.pid)
    assert not (tmp_path / "cache" / "models" / "r1seg3d-phi3").exists()
    assert not next(c for c in model_picker.model_choices() if c.name == "r1seg3d-phi3").installed


def test_an_interrupted_download_says_so_and_the_next_download_completes_it(hub, tmp_path):
    hub.drop_after["model.safetensors"] = 200_000          # the server goes away mid-file
    download = model_picker.ModelDownload("r1seg3d-phi3")
    download.start()
    failed = run_to_end(download)[-1]
    assert isinstance(failed, model_picker.DownloadFailed) and "interrupted" in failed.message
    assert "run the same command" in failed.message.lower()
    del hub.drop_after["model.safetensors"]                 # the server is back: Download again
    again = model_picker.ModelDownload("r1seg3d-phi3")
    again.start()
    assert run_to_end(again)[-1] == model_picker.DownloadFinished(str(tmp_path / "cache" / "models" / "r1seg3d-phi3"))
