"""The chat panel without Qt: chat state machine, background worker, engine session, and the module
file itself (compiles, imports nothing heavy, widget uses only Slicer's qt/ctk/slicer, Logic works)."""
import ast
import hashlib
import importlib.util
import subprocess
import sys
import threading
import time
import types
import weakref
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest

MODULE_DIR = Path(__file__).resolve().parents[1] / "R1Seg3DSlicer"
MODULE_FILE = MODULE_DIR / "R1Seg3DSlicer.py"
sys.path.insert(0, str(MODULE_DIR))

from R1Seg3DSlicerLib import chat, engine, events  # noqa: E402
from R1Seg3DSlicerLib.chat import ChatError, ChatSession, ChatState, FoundTarget, TurnStatus  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def liver_target(segment_id="S1"):
    return FoundTarget("liver", 1125.7, 41692, segmentation_node_id="vtkMRMLSegmentationNode1", segment_id=segment_id)


# ---- chat state machine ----------------------------------------------------------------------------


def test_a_question_runs_and_is_answered():
    clock = Clock()
    session = ChatSession(clock)
    assert session.state is ChatState.IDLE and session.send_button_text == "Send"
    session.send("  segment the liver ", "CT chest")
    assert session.state is ChatState.RUNNING
    assert session.send_button_text == "Cancel" and session.send_button_enabled and not session.question_editable
    assert session.status_text.startswith("Starting")

    session.report_progress(3, 12, "Segmenting")
    assert session.progress.fraction == pytest.approx(0.25)
    assert "Segmenting: 3/12" in session.status_text

    clock.now += 4.25
    turn = session.complete("The liver is segmented.", True, [liver_target()], ["fell back to the CPU"], "cuda:0", "undo")
    assert session.state is ChatState.IDLE and session.progress is None
    assert turn.question == "segment the liver" and turn.status is TurnStatus.ANSWERED
    assert turn.elapsed_s == pytest.approx(4.25)
    assert session.status_text == "Answered in 4.2 s on cuda:0"
    page = session.transcript_html()
    assert "The liver is segmented." in page and "1125.7 mL" in page and "fell back to the CPU" in page
    assert 'href="r1seg:toggle/0/0"' in page and 'href="r1seg:center/0/0"' in page and 'href="r1seg:undo/0"' in page


def test_one_question_at_a_time_and_no_empty_question():
    session = ChatSession(Clock())
    with pytest.raises(ChatError):
        session.send("   ", "ct")
    session.send("segment the spleen", "ct")
    with pytest.raises(ChatError):
        session.send("segment the liver", "ct")
    with pytest.raises(ChatError):
        session.clear()


def test_cancel_goes_through_cancelling_and_adds_nothing():
    session = ChatSession(Clock())
    assert not session.request_cancel()  # nothing to cancel
    session.send("segment the kidneys", "ct")
    assert session.request_cancel()
    assert session.state is ChatState.CANCELLING
    assert session.send_button_text == "Cancelling…" and not session.send_button_enabled
    assert not session.request_cancel()  # a second click changes nothing
    turn = session.mark_cancelled()
    assert turn.status is TurnStatus.CANCELLED and session.state is ChatState.IDLE
    assert "nothing was added" in session.transcript_html()
    session.report_progress(5, 10, "late event")  # from the cancelled run: ignored
    assert session.progress is None


def test_errors_are_messages_in_the_conversation():
    session = ChatSession(Clock())
    session.send("segment <b>everything</b>", "ct")
    session.fail("Model folder /x has no config.json.")
    page = session.transcript_html()
    assert "Error:</b> Model folder /x has no config.json." in page
    assert "&lt;b&gt;everything&lt;/b&gt;" in page and "<b>everything</b>" not in page
    assert session.state is ChatState.IDLE and session.turns[-1].status is TurnStatus.FAILED
    assert "failed" in session.status_text
    with pytest.raises(ChatError):
        session.fail("no question runs")


def test_not_found_and_empty_mask_are_said_plainly():
    session = ChatSession(Clock())
    session.send("is there a gallbladder?", "ct")
    session.complete("No gallbladder is visible in this scan.", False, [FoundTarget("gallbladder", 0.0, 0)])
    page = session.transcript_html()
    assert "No segment was added" in page and "empty mask, not added" in page
    assert "r1seg:undo" not in page


def test_follow_up_turns_undo_visibility_and_clear():
    session = ChatSession(Clock())
    session.send("segment the liver", "ct")
    session.complete("Liver found.", True, [liver_target("S1")], undo_token="change-1")
    session.send("and the spleen?", "ct")
    session.complete("Spleen found.", True, [FoundTarget("spleen", 261.0, 9667, "vtkMRMLSegmentationNode1", "S2")],
                     undo_token="change-2")
    assert [t.question for t in session.turns] == ["segment the liver", "and the spleen?"]

    session.set_visibility(1, 0, False)
    assert 'href="r1seg:toggle/1/0">show</a>' in session.transcript_html()

    turn = session.mark_undone(1)
    assert turn.undone and not turn.can_undo and turn.targets[0].segment_id is None
    assert "Undone" in session.transcript_html()
    with pytest.raises(ChatError):
        session.mark_undone(1)

    session.forget_segmentation("vtkMRMLSegmentationNode1")  # the user deleted the segmentation
    assert not session.turns[0].can_undo and "(removed)" in session.transcript_html()

    session.clear()
    assert session.turns == () and session.status_text.startswith("Ask")


def test_up_and_down_recall_earlier_questions_like_a_shell():
    session = ChatSession(Clock())
    history = session.history
    assert history.previous("draft") is None and history.next("draft") is None  # nothing asked yet
    for question in ("segment the liver", "and the spleen?", "and the spleen?", "the left kidney"):
        session.send(question, "ct")
        session.complete("Done.", True, [])
    session.clear()  # the conversation goes; what the user typed stays recallable
    # Up from a half-typed question: newest first, the repeat kept once, and Up at the oldest changes nothing.
    assert [history.previous("segm") for _ in range(4)] == [
        "the left kidney", "and the spleen?", "segment the liver", None]
    # Down walks forward and, past the newest, gives back the half-typed text; then there is nothing further.
    assert [history.next("x") for _ in range(4)] == ["and the spleen?", "the left kidney", "segm", None]
    # Sending starts the walk again from the newest question.
    assert history.previous("") == "the left kidney"
    session.send("segment the liver", "ct")
    session.complete("Done.", True, [])
    assert history.previous("") == "segment the liver" and history.previous("") == "the left kidney"


@pytest.mark.parametrize(
    "url, expected",
    [
        ("r1seg:toggle/2/1", chat.Link("toggle", 2, 1)),
        ("r1seg:center/0/3", chat.Link("center", 0, 3)),
        ("r1seg:undo/4", chat.Link("undo", 4)),
        ("r1seg:undo/4/1", None),
        ("r1seg:toggle/1", None),
        ("r1seg:delete/1/1", None),
        ("r1seg:toggle/a/1", None),
        ("https://example.org", None),
    ],
)
def test_links_round_trip(url, expected):
    assert chat.parse_link(url) == expected
    if expected is not None:
        assert chat.link_url(expected.action, expected.turn_index, expected.target_index) == url


# ---- background worker ------------------------------------------------------------------------------


# ---- engine session -----------------------------------------------------------------------------------


class RecordingPredictor:
    def __init__(self, folder, device, dtype):
        self.folder, self.device, self.dtype, self.calls = folder, device, dtype, []

    def ask(self, volume, question, **kwargs):
        self.calls.append(kwargs)
        return "result"


def test_model_is_loaded_once_and_reloaded_only_when_settings_change():
    loads = []

    def factory(folder, device, dtype):
        loads.append((folder, device, dtype))
        return RecordingPredictor(folder, device, dtype)

    session = engine.R1SegSession(predictor_factory=factory)
    first = session.predictor(engine.AskOptions(device="cpu"))
    assert session.predictor(engine.AskOptions(model_dir="", device="cpu", loops=2)) is first
    session.predictor(engine.AskOptions(device="cuda"))
    half = session.predictor(engine.AskOptions(device="cuda", dtype="bfloat16"))
    assert session.predictor(engine.AskOptions(device="cuda", dtype="bfloat16", overlap=0.3)) is half
    session.predictor(engine.AskOptions(device="cuda", dtype="float32"))
    assert loads == [(None, "cpu", "auto"), (None, "cuda", "auto"), (None, "cuda", "bfloat16"), (None, "cuda", "float32")]


def test_unset_options_are_left_to_the_predictor():
    predictor = RecordingPredictor(None, "cpu", "auto")
    session = engine.R1SegSession(predictor_factory=lambda folder, device, dtype: predictor)
    session.ask("volume", "q", engine.AskOptions())
    session.ask("volume", "q", engine.AskOptions(overlap=0.5, loops=0))
    assert "overlap" not in predictor.calls[0] and "loops" not in predictor.calls[0]
    assert predictor.calls[1]["overlap"] == 0.5 and predictor.calls[1]["loops"] == 0


def test_conversation_follows_the_volume():
    session = engine.R1SegSession(conversation_factory=object)
    first = session.conversation_for("vtkMRMLScalarVolumeNode1")
    assert session.conversation_for("vtkMRMLScalarVolumeNode1") is first  # follow-up questions
    other = session.conversation_for("vtkMRMLScalarVolumeNode2")
    assert other is not first  # another scan, a fresh context
    session.clear_conversation()
    assert session.conversation_for("vtkMRMLScalarVolumeNode2") is not other


def test_error_messages_for_the_conversation():
    from r1seg_core.errors import CheckpointError

    assert engine.describe_error(CheckpointError("The model folder has no weights.")) == "The model folder has no weights."
    assert "Out of memory" in engine.describe_error(MemoryError())
    unexpected = engine.describe_error(KeyError("windows"))
    assert "Unexpected error" in unexpected and "Python console" in unexpected


def test_out_of_memory_in_float32_on_the_cpu_points_to_bfloat16():
    from r1seg_core.errors import OutOfMemoryError

    engine_error = OutOfMemoryError("out of CPU memory for this CT: free memory, or crop the CT (can't allocate memory)")
    for options in (engine.AskOptions(device="cpu"), engine.AskOptions(dtype="float32")):
        message = engine.describe_error(engine_error, options)
        assert message.startswith(str(engine_error) + ". ") and "bfloat16 precision (Advanced)" in message
    on_cpu = engine.describe_error(MemoryError(), engine.AskOptions(device="cpu"))
    assert "bfloat16 precision" in on_cpu and "CPU device" not in on_cpu  # it already runs there
    for options in (engine.AskOptions(device="cpu", dtype="bfloat16"), engine.AskOptions(device="cuda"), None):
        assert "bfloat16" not in engine.describe_error(engine_error, options)
    assert "Try the CPU device" in engine.describe_error(MemoryError(), engine.AskOptions(device="cuda"))


# ---- the module file ----------------------------------------------------------------------------------

ALLOWED_TOP_LEVEL_IMPORTS = {
    "enum", "importlib", "logging", "os", "pathlib", "re", "sys", "tempfile", "typing",  # standard library, light
    "ctk", "qt", "vtk", "slicer", "R1Seg3DSlicerLib",
}
FOREIGN_GUI_TOOLKITS = ("PyQt", "PySide", "tkinter", "wx", "gi", "matplotlib")


def module_tree():
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def imported_roots(nodes):
    roots = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    return roots


def test_module_file_compiles(tmp_path):
    import py_compile

    for path in [MODULE_FILE, MODULE_DIR / "batch.py", *sorted((MODULE_DIR / "R1Seg3DSlicerLib").glob("*.py"))]:
        py_compile.compile(str(path), cfile=str(tmp_path / (path.name + "c")), doraise=True)  # nothing written beside it


def test_every_module_file_is_listed_in_cmake():
    """Slicer packages only what CMakeLists.txt lists; a forgotten file is silently missing."""
    listed = (MODULE_DIR / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "R1Seg3DSlicer")
    shipped = [MODULE_FILE, *(MODULE_DIR / "R1Seg3DSlicerLib").glob("*.py"), *(MODULE_DIR / "Resources").rglob("*.*")]
    for path in shipped:
        assert path.relative_to(MODULE_DIR).as_posix() in listed, path
    assert "batch.py" in listed


def test_module_imports_nothing_heavy_at_import_time():
    top_level = imported_roots(node for node in module_tree().body)
    assert top_level <= ALLOWED_TOP_LEVEL_IMPORTS, top_level - ALLOWED_TOP_LEVEL_IMPORTS
    everywhere = imported_roots(ast.walk(module_tree()))
    assert not any(root.startswith(FOREIGN_GUI_TOOLKITS) for root in everywhere), everywhere


def test_widget_uses_only_slicer_qt_ctk():
    tree = module_tree()
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "R1Seg3DSlicerWidget")
    module_names = {alias.asname or alias.name.split(".")[0] for node in tree.body
                    if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    used = {node.id for node in ast.walk(widget) if isinstance(node, ast.Name) and node.id in module_names}
    # vtk only for observer event ids, importlib and sys to reload the Lib; the Lib modules are plain Python (no GUI
    # toolkit at all).
    assert used <= {"qt", "ctk", "slicer", "vtk", "logging", "importlib", "sys", "_", "chat", "engine", "provenance",
                    "scene", "events", "model_picker", "LIB_MODULES", "ScriptedLoadableModuleWidget", "VTKObservationMixin"}, used
    assert not imported_roots(ast.walk(widget))  # no imports hidden inside the widget


def stub_modules():
    """Just enough of Slicer's Python layer (absent from slicer-core) to import the module file."""
    import slicer

    class Base:
        def __init__(self, *args, **kwargs):
            pass

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (Base,), {}))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.WithinRange = lambda low, high: (low, high)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    return {"qt": mock.MagicMock(), "ctk": mock.MagicMock(), "slicer.ScriptedLoadableModule": scripted,
            "slicer.parameterNodeWrapper": wrapper, "slicer.i18n": i18n, "slicer": slicer}


@pytest.fixture
def module(monkeypatch):
    for name, stub in stub_modules().items():
        monkeypatch.setitem(sys.modules, name, stub)
    spec = importlib.util.spec_from_file_location("R1Seg3DSlicer", MODULE_FILE)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def test_importing_the_module_loads_neither_torch_nor_the_engine():
    probe = f"""
import sys
sys.path.insert(0, {str(MODULE_DIR)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_slicer_chat import stub_modules
sys.modules.update(stub_modules())
import importlib.util
spec = importlib.util.spec_from_file_location("R1Seg3DSlicer", {str(MODULE_FILE)!r})
spec.loader.exec_module(importlib.util.module_from_spec(spec))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "r1seg_core", "transformers", "monai", "SimpleITK"))
print("HEAVY", heavy)
"""
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert output.returncode == 0, output.stderr
    assert "HEAVY []" in output.stdout, output.stdout


def test_advanced_settings_become_ask_options(module):
    parameters = SimpleNamespace(useModelDefaults=True, modelFolder="", device=module.DeviceChoice.AUTO,
                                 precision=module.PrecisionChoice.AUTO, profile=module.ProfileChoice.AUTO,
                                 slidingWindow=True, refinementLoops=2, windowOverlap=0.6)
    assert module.R1Seg3DSlicerLogic.askOptions(parameters) == engine.AskOptions(None, "auto", "auto", None, None)
    parameters.useModelDefaults, parameters.modelFolder, parameters.device = False, "/models/r1", module.DeviceChoice.GPU
    parameters.precision = module.PrecisionChoice.BFLOAT16
    assert module.R1Seg3DSlicerLogic.askOptions(parameters) == engine.AskOptions("/models/r1", "cuda", "bfloat16", 0.6, 2)
    assert [choice.value for choice in module.PrecisionChoice] == ["auto", "float32", "bfloat16"]
    assert "half the memory" in module.PrecisionChoice.BFLOAT16.label()


class WindowedPredictor:
    """Answers "liver" after `windows` progress steps of `pause` seconds; honours cancel."""

    def __init__(self, windows=5, pause=0.0):
        self.windows, self.pause = windows, pause

    def ask(self, volume, question, *, conversation=None, progress=None, cancel=None, **options):
        for window in range(self.windows):
            time.sleep(self.pause)
            if progress:
                progress(window + 1, self.windows, "Segmenting")
        mask = np.zeros(volume.array.shape, np.uint8)
        mask[2:5, 3:6, 4:8] = 1
        target = SimpleNamespace(name="liver", mask=mask, probability=None, volume_ml=0.05, voxel_count=int(mask.sum()))
        return SimpleNamespace(answer="Here is the liver.", present=True, targets=[target], timings={}, notes=[],
                               device="cpu", profile="project")


def run_logic_question(logic, volume_node, timeout=10.0, options=engine.AskOptions(device="cpu")):
    logic.startQuestion(volume_node, "segment the liver", options)
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(isinstance(e, events.TERMINAL_EVENTS) for e in seen):
        time.sleep(0.02)
        seen += logic.pollEvents()
    return seen


def scripted_logic(module, predictor_factory):
    """The module's Logic with a scripted predictor for its blocking `process` and no vocabulary."""
    return module.R1Seg3DSlicerLogic(session=engine.R1SegSession(predictor_factory=predictor_factory,
                                                                  vocabulary_loader=lambda: None))


@pytest.fixture
def scene_with_ct():
    """A headless MRML scene holding a small CT node (the engine must be importable for the Logic's runs)."""
    pytest.importorskip("r1seg_core.volume")
    from R1Seg3DSlicerLib import scene

    headless = scene.create_headless_scene()
    return headless, scene.add_volume_node(headless.scene, np.full((8, 9, 10), -50, np.int16), (1.0, 1.0, 2.0),
                                           (0, 0, 0), np.eye(3), "ct")


def test_the_logic_keeps_each_answers_provenance_with_its_segments(module, scene_with_ct):
    from R1Seg3DSlicerLib import provenance

    headless, volume_node = scene_with_ct
    logic = scripted_logic(module, lambda folder, device, dtype: WindowedPredictor(windows=2, pause=0.01))
    try:
        # Blocking (scripts): the record is written with the segments.
        result, change, _ = logic.process(volume_node, "segment the liver", engine.AskOptions(device="cpu", loops=1))
        segmentation_node = headless.scene.GetNodeByID(change.segmentation_node_id)
        (record,) = provenance.records(segmentation_node)
        assert (record.question, record.answer, record.loops, record.profile) == (
            "segment the liver", "Here is the liver.", 1, "project")
        assert record.elapsed_s >= 0.02 and record.segment_ids == change.segment_ids and len(record.config_sha256) == 64

        # The panel's way: the record is made from the question's settings and the chat's clock, then written.
        logic.setRemoteServer("https://gpu-host:8740", "token")
        remote = logic.answerRecord(volume_node, "and again?", result, engine.AskOptions(), 3.5)
        assert (remote.model_folder, remote.config_sha256, remote.elapsed_s) == ("https://gpu-host:8740", "", 3.5)
        logic.writeAnswer(volume_node, result, remote)
        assert [r.question for r in provenance.records(segmentation_node)] == ["segment the liver", "and again?"]
    finally:
        logic.shutdown()


class FakeServer:
    """What an R1Seg3D server keeps between requests, for `fake_client`: CTs, conversations, the questions asked."""

    def __init__(self):
        self.volumes, self.conversations, self.asked = set(), set(), []
        self._ids = iter(range(1, 100))

    def client_class(self):
        server = self

        class Client:
            loopback = True

            def __init__(self, url, token=None, allow_insecure=False):
                self.url = url

            def health(self):
                from R1Seg3DSlicerLib import connection

                return {"status": "ok", "model": "ready", "api": connection.API_VERSION, "version": "0.1.0"}

            def upload(self, nrrd):
                key = hashlib.sha256(nrrd).hexdigest()
                server.volumes.add(key)
                return key

            def new_conversation(self):
                key = f"c{next(server._ids)}"
                server.conversations.add(key)
                return key

            def submit(self, volume_id, question, conversation_id=None, **options):
                assert volume_id in server.volumes and (conversation_id is None or conversation_id in server.conversations)
                server.asked.append((question, conversation_id))
                return {"job_id": f"j{len(server.asked)}"}

            def status(self, job_id):
                return {"state": "done", "done": 0, "total": 0}

            def result(self, job_id):
                return {"answer": "Nothing here.", "present": False, "targets": [], "notes": [], "timings_s": {},
                        "device": "cpu", "profile": "project"}

            def forget_conversation(self, key):
                server.conversations.discard(key)

            def forget_volume(self, key):
                server.volumes.discard(key)

        return Client


def test_clear_and_scene_close_start_new_server_conversations_and_free_the_servers_copies(module, scene_with_ct,
                                                                                         monkeypatch):
    from R1Seg3DSlicerLib import connection

    _, volume_node = scene_with_ct
    server = FakeServer()
    monkeypatch.setattr(connection, "remote_client", server.client_class())
    logic = module.R1Seg3DSlicerLogic()
    logic.setRemoteServer("http://127.0.0.1:9", "token")

    def conversation_of_next_question():
        assert isinstance(run_logic_question(logic, volume_node)[-1], events.FinishedEvent)
        return server.asked[-1][1]

    try:
        first = conversation_of_next_question()
        assert conversation_of_next_question() == first  # a follow-up keeps the context
        logic.clearConversation()
        assert first not in server.conversations  # the server forgot the cleared turns
        second = conversation_of_next_question()
        assert second != first
        assert server.volumes  # the CT stays on the server while the scene is open
        logic.releaseScene()  # the scene closes
        assert server.volumes == set() and server.conversations == set()
        third = conversation_of_next_question()
        assert third not in (first, second) and len(server.volumes) == 1
    finally:
        logic.shutdown()


def test_unload_model_frees_a_model_loaded_by_the_blocking_process(module, scene_with_ct):
    _, volume_node = scene_with_ct
    loaded = []

    def factory(folder, device, dtype):
        predictor = WindowedPredictor(windows=1)
        loaded.append(weakref.ref(predictor))
        return predictor

    logic = scripted_logic(module, factory)
    options = engine.AskOptions(device="cpu")
    logic.process(volume_node, "segment the liver", options)
    logic.process(volume_node, "and again", options)
    assert len(loaded) == 1 and loaded[0]() is not None  # kept between questions
    logic.unloadModel()
    assert loaded[0]() is None  # nothing holds it any more: its memory is back
    logic.process(volume_node, "segment the liver", options)
    assert len(loaded) == 2  # the next question loads it again
