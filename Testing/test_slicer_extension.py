"""The Slicer extension as a package: version floors, the shipped terminology, what CMake installs.

Runs against the PyPI slicer-core wheel (real MRML and Terminologies logic) and the real CMake, no Slicer.
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "R1Seg3DSlicer"))

import slicer  # noqa: E402
from R1Seg3DSlicerLib import engine, scene, terminology  # noqa: E402
from test_slicer_chat import module  # noqa: E402,F401  (the module file imported with Slicer's Python layer stubbed)

STRUCTURES = json.loads(terminology.STRUCTURES_FILE.read_text(encoding="utf-8"))["structures"]


# ---- versions ----------------------------------------------------------------------------------


@pytest.fixture
def installs(module, monkeypatch):
    """Every way the module could install something, recorded; Slicer 5.12 unless a test says otherwise."""
    import slicer.util

    calls = []
    packaging = SimpleNamespace(load_requirements=lambda path: [], pip_check=lambda requirement: True)
    monkeypatch.setattr(slicer, "app", SimpleNamespace(majorVersion=5, minorVersion=12), raising=False)
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.setattr(slicer.util, "pip_install", lambda *args: calls.append(("pip_install", args)), raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay",
                        lambda *args, **kwargs: calls.append(("asked", args)) or True, raising=False)
    return calls


def pretend_installed(monkeypatch, **versions):
    real = engine.metadata.version
    monkeypatch.setattr(engine.metadata, "version", lambda name: versions.get(name) or real(name))


@pytest.mark.parametrize("package, old, fix", [
    ("torch", "2.4.1+cu121", 'torchVersionRequirement=">=2.5"'),
    ("transformers", "4.55.2", 'slicer.util.pip_install("transformers>=4.56")'),
])
def test_too_old_torch_or_transformers_is_refused_with_the_fix(module, installs, monkeypatch, package, old, fix):
    pretend_installed(monkeypatch, **{package: old})
    logic = module.R1Seg3DSlicerLogic(session=engine.R1SegSession())
    message = logic.setUp(interactive=True)   # refused before anything is asked or installed
    assert f"{package} {old} is too old" in message and fix in message
    assert installs == []


def test_old_slicer_is_refused_and_current_versions_pass(module, installs, monkeypatch):
    from R1Seg3DSlicerLib import setup_step

    assert setup_step.blocking_problems((5, 12)) == []  # this environment: torch 2.13, transformers 5.x
    (problem,) = setup_step.blocking_problems((5, 8))
    assert "5.10 or newer" in problem and "download.slicer.org" in problem
    monkeypatch.setattr(slicer, "app", SimpleNamespace(majorVersion=5, minorVersion=8))
    logic = module.R1Seg3DSlicerLogic(session=engine.R1SegSession())
    assert logic.setUp(interactive=True) == problem and installs == []


def test_version_floors_agree_with_pyproject():
    pyproject = (REPO / "pyproject.toml").read_text()
    requirements = (REPO / "R1Seg3DSlicer" / "Resources" / "requirements.txt").read_text()
    for requirement in ("transformers>=4.56", "peft>=0.8", "gguf>=0.10"):
        assert f'"{requirement}"' in pyproject and f"\n{requirement}\n" in requirements
    # The engine never imports monai (only training and the evaluation do): Slicer does not get it.
    assert "monai" not in requirements


# ---- terminology --------------------------------------------------------------------------------


def test_shipped_terminology_is_the_one_generated_from_the_vocabulary():
    assert terminology.TERMINOLOGY_FILE.read_text(encoding="utf-8") == terminology.terminology_text(), (
        "Resources/R1Seg3D.term.json is out of date: run python3 R1Seg3DSlicer/R1Seg3DSlicerLib/terminology.py")


def codes(structure):
    def code(value):
        return None if value is None else scene.Code(value["scheme"], value["value"], value["meaning"])
    return scene.SegmentTerminology(code(structure["category"]), code(structure["type"]), code(structure["type_modifier"]))


def test_every_vocabulary_code_resolves_through_slicers_terminology_logic():
    context = scene.R1Seg3DTerminology(slicer.vtkSlicerTerminologiesModuleLogic())
    owners = {}
    for structure in STRUCTURES:
        styled = context.style(codes(structure))
        assert styled is not None, structure["name"]
        entry_text, color = styled
        entry = slicer.vtkSlicerTerminologyEntry()
        assert context.logic.DeserializeTerminologyEntry(entry_text, entry)
        assert entry.GetTerminologyContextName() == terminology.CONTEXT_NAME
        assert entry.GetCategoryObject().GetCodeValue() == structure["category"]["value"]
        assert entry.GetTypeObject().GetCodeValue() == structure["type"]["value"]
        assert entry.GetTypeModifierObject().GetCodeValue() == (structure["type_modifier"] or {}).get("value")
        # The first structure with a code triplet owns its entry's colour (terminology.py's docstring).
        owner = owners.setdefault(entry_text, structure)
        assert color == tuple(owner["color"]), structure["name"]
    triplets = {json.dumps([s["category"], s["type"], s["type_modifier"]], sort_keys=True) for s in STRUCTURES}
    assert len(owners) == len(triplets)  # the tumours, cysts and eyeball halves share theirs


def test_segments_take_colour_and_entry_from_the_terminology():
    headless = scene.create_headless_scene()
    volume_node = scene.add_volume_node(headless.scene, np.zeros((4, 5, 6), "int16"), (1, 1, 1), (0, 0, 0), np.eye(3),
                                        "ct")
    mask = np.ones((4, 5, 6), "uint8")
    left_kidney = next(s for s in STRUCTURES if s["name"] == "left kidney")
    unknown = scene.SegmentTerminology(scene.Code("SCT", "123037004", "Anatomical Structure"),
                                       scene.Code("SCT", "1", "Not in the vocabulary"))
    change = scene.write_segments(volume_node, [scene.SegmentSpec("left kidney", mask, (1, 2, 3), codes(left_kidney)),
                                                scene.SegmentSpec("other", mask, (4, 5, 6), unknown)])
    segmentation = headless.scene.GetNodeByID(change.segmentation_node_id).GetSegmentation()
    kidney, other = (segmentation.GetSegment(segment_id) for segment_id in change.segment_ids)
    assert tuple(round(c * 255) for c in kidney.GetColor()) == tuple(left_kidney["color"])
    assert kidney.GetTerminology().startswith(terminology.CONTEXT_NAME + "~")
    assert "SCT^7771000^Left" in kidney.GetTerminology()
    # Codes the context lacks are kept as given, with the colour they came with.
    assert tuple(round(c * 255) for c in other.GetColor()) == (4, 5, 6) and "SCT^1^" in other.GetTerminology()


# ---- Sample Data ---------------------------------------------------------------------------------


def test_the_sample_ct_is_offered_in_sample_data_with_its_true_checksum(module, monkeypatch):
    import hashlib
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    registered = []
    sample_data = SimpleNamespace(SampleDataLogic=SimpleNamespace(
        registerCustomSampleDataSource=lambda **kwargs: registered.append(kwargs)))
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    module.registerSampleData()
    (source,) = registered
    path = Path(url2pathname(urlparse(source["uris"]).path))
    assert path == REPO / "r1seg_core" / "data" / source["fileNames"] and path.is_file()
    # Sample Data verifies the file against this before loading it: a replaced CT must come with a new checksum.
    assert source["checksums"] == "SHA256:" + hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the panel's .ui ----------------------------------------------------------------------------

UI_FILE = REPO / "R1Seg3DSlicer" / "Resources" / "UI" / "R1Seg3DSlicer.ui"
MODULE_FILE = REPO / "R1Seg3DSlicer" / "R1Seg3DSlicer.py"
QT_WIDGETS = {"QWidget", "QLabel", "QPushButton", "QLineEdit", "QTextBrowser", "QPlainTextEdit", "QComboBox",
              "QCheckBox", "QSpinBox", "QDoubleSpinBox", "QProgressBar"}
# Slicer and CTK widgets and their Qt Designer base classes, from their headers (Slicer: qMRMLWidget.h,
# qMRMLNodeComboBox.h, Modules/Loadable/Segmentations/Widgets/qMRMLSegmentsTableView.h and
# qMRMLSegmentationShow3DButton.h; CTK: ctkCollapsibleButton.h, ctkPathLineEdit.h, ctkMenuButton.h).
SLICER_WIDGETS = {"qMRMLWidget": "QWidget", "qMRMLNodeComboBox": "QWidget", "qMRMLSegmentsTableView": "qMRMLWidget",
                  "qMRMLSegmentationShow3DButton": "ctkMenuButton", "ctkMenuButton": "QPushButton",
                  "ctkCollapsibleButton": "QWidget", "ctkPathLineEdit": "QWidget"}
# The parameter-node connectors of Slicer's parameterNodeWrapper/guiConnectors.py: field type -> the widget class
# it binds (each connector checks type(widget) exactly).
CONNECTOR_WIDGETS = {"bool": "QCheckBox", "int": "QSpinBox", "float": "QDoubleSpinBox", "str": "QLineEdit",
                     "vtkMRMLScalarVolumeNode": "qMRMLNodeComboBox", "enum": "QComboBox"}


@pytest.fixture(scope="module")
def ui():
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.parse(UI_FILE).getroot()
    widgets = {widget.get("name"): widget for widget in root.iter("widget")}
    custom = {entry.findtext("class"): entry for entry in root.iter("customwidget")}
    return SimpleNamespace(root=root, widgets=widgets, custom=custom)


def names_looked_up_in_ui():
    """Every `self.ui.<name>` in the module file."""
    import ast

    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def test_the_module_loads_the_ui_file_as_slicers_template_does():
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert 'slicer.util.loadUI(self.resourcePath("UI/R1Seg3DSlicer.ui"))' in source
    assert "slicer.util.childWidgetVariables(uiWidget)" in source and "connectGui(self.ui)" in source


def test_every_widget_the_module_looks_up_is_in_the_ui_with_a_real_class(ui):
    looked_up = names_looked_up_in_ui()
    assert {"transcriptView", "questionEdit", "sendButton", "show3DButton", "segmentsTable", "provenanceView",
            "modelFolderEdit"} <= looked_up
    missing = looked_up - set(ui.widgets)
    assert not missing, f"the module uses self.ui.{sorted(missing)} but R1Seg3DSlicer.ui has no such widget"
    assert ui.root.find("widget").get("class") == "qMRMLWidget"  # uiWidget.setMRMLScene needs it
    for name, widget in ui.widgets.items():
        cls = widget.get("class")
        assert cls in QT_WIDGETS or cls in SLICER_WIDGETS, f"{name}: unknown widget class {cls}"
        if cls in SLICER_WIDGETS:  # Qt Designer builds custom widgets from their declaration
            declared = ui.custom[cls]
            assert declared.findtext("header") == f"{cls}.h" and declared.findtext("extends") == SLICER_WIDGETS[cls]
    assert ui.widgets["show3DButton"].get("class") == "qMRMLSegmentationShow3DButton"
    assert ui.widgets["segmentsTable"].get("class") == "qMRMLSegmentsTableView"
    # Every MRML widget gets the scene from the top-level widget, as in Slicer's template.
    receivers = {connection.findtext("receiver") for connection in ui.root.iter("connection")
                 if connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and connection.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml_widgets = {name for name, widget in ui.widgets.items()
                    if widget.get("class") in ("qMRMLNodeComboBox", "qMRMLSegmentsTableView")}
    assert mrml_widgets and mrml_widgets <= receivers


def parameter_fields():
    """{field: type name} of the module's parameter node, from the source (enums are "enum")."""
    import ast

    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    enums = {node.name for node in tree.body if isinstance(node, ast.ClassDef)
             and any(getattr(base, "attr", None) == "Enum" for base in node.bases)}
    wrapper = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "R1Seg3DSlicerParameterNode")
    fields = {}
    for statement in wrapper.body:
        if isinstance(statement, ast.AnnAssign):
            annotation = statement.annotation
            if isinstance(annotation, ast.Subscript):  # Annotated[int, WithinRange(...)]
                annotation = annotation.slice.elts[0]
            fields[statement.target.id] = "enum" if annotation.id in enums else annotation.id
    return fields


def test_parameter_bindings_in_the_ui_fit_slicers_connectors(ui):
    fields = parameter_fields()
    bound = {}
    for name, widget in ui.widgets.items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    assert set(bound) <= set(fields), set(bound) - set(fields)
    for field, cls in bound.items():
        assert CONNECTOR_WIDGETS[fields[field]] == cls, (field, fields[field], cls)
    # The model folder is synced by hand (no connector binds a str to a ctkPathLineEdit); every other field is bound.
    assert set(fields) - set(bound) == {"modelFolder"}


# ---- translation --------------------------------------------------------------------------------


def test_chat_texts_go_through_the_translation_function(monkeypatch):
    from R1Seg3DSlicerLib import chat, provenance

    translated = []

    def translate(text):
        translated.append(text)
        return "«" + text + "»"

    monkeypatch.setattr(chat, "_", translate)
    session = chat.ChatSession(clock=lambda: 10.0)
    assert session.send_button_text == "«Send»" and session.status_text == "«Ask a question about the selected CT.»"
    session.send("segment the liver", "ct")
    session.report_progress(2, 8, "Segmenting")
    assert session.status_text == "«Segmenting: 2/8 (0 s)»" and session.send_button_text == "«Cancel»"
    session.complete("Found it.", True, [chat.FoundTarget("liver", 12.5, 9, "vtkMRMLSegmentationNode1", "S1")],
                     notes=["a note"], undo_token="change")
    page = session.transcript_html()
    for text in ("«You»", "«12.5 mL»", "«hide»", "«centre»", "«Undo this answer»", "«Note: a note»"):
        assert text in page, text
    assert session.status_text == "«Answered in 0.0 s»"
    # Placeholders stay untranslated inside the template, as Slicer's tr() requires.
    assert "{stage}: {done}/{total} ({seconds:.0f} s)" in translated

    monkeypatch.setattr(provenance, "_", translate)
    record = provenance.AnswerRecord("q", "a", "/m", "m", "", "project", None, None, True, "cpu", "auto", 1.0,
                                     "2026-01-01T00:00:00+00:00", "ct")
    assert provenance.describe(record).startswith("«Question: q»")


def test_the_lib_uses_slicers_tr_when_slicer_has_one(monkeypatch):
    """Inside Slicer the Lib's `_` is slicer.i18n.tr itself, so Slicer takes each text's context from its file."""
    import importlib.util
    import types

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: "translated " + text
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
    path = REPO / "R1Seg3DSlicer" / "R1Seg3DSlicerLib" / "i18n.py"
    spec = importlib.util.spec_from_file_location("r1seg_i18n_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.tr is i18n.tr
    from R1Seg3DSlicerLib import i18n as without_slicer  # slicer-core has no slicer.i18n: English

    assert without_slicer.tr("Send") == "Send"


# ---- profile and sliding window -----------------------------------------------------------------


def test_profile_and_sliding_window_reach_the_predictor_and_the_server(module):
    from R1Seg3DSlicerLib import server_client, server_process

    parameters = SimpleNamespace(useModelDefaults=True, modelFolder="", device=module.DeviceChoice.CPU,
                                 precision=module.PrecisionChoice.AUTO, profile=module.ProfileChoice.ORIGINAL,
                                 slidingWindow=False, refinementLoops=1, windowOverlap=0.5)
    options = module.R1Seg3DSlicerLogic.askOptions(parameters)
    assert (options.profile, options.sliding_window) == ("original", False)

    loads, asks = [], []

    class Recording:
        def ask(self, volume, question, **kwargs):
            asks.append(kwargs)

    session = engine.R1SegSession(predictor_factory=lambda *args, **kwargs: loads.append((args, kwargs)) or Recording())
    session.ask("volume", "q", options)
    session.ask("volume", "q", engine.AskOptions(device="cpu"))
    assert loads == [((None, "cpu", "auto"), {"profile": "original"}), ((None, "cpu", "auto"), {})]
    assert asks[0]["sliding_window"] is False and "sliding_window" not in asks[1]
    assert server_client.server_options(options)["sliding_window"] is False
    server = server_process.LocalServer(None, "cpu", "auto", "original")
    assert server.key == (None, "cpu", "auto", "original")
    assert server._arguments[server._arguments.index("--profile") + 1] == "original"
