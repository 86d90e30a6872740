"""The Slicer extension as a package: version floors, the shipped terminology, what CMake installs.

Runs against the PyPI slicer-core wheel (real MRML and Terminologies logic) and the real CMake, no Slicer.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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
    packaging = SimpleNamespace(load_requirements=lambda path: [], pip_check=lambda requirement: True,
                                pip_ensure=lambda *args, **kwargs: calls.append(("pip_ensure", args)))
    monkeypatch.setattr(slicer, "app", SimpleNamespace(majorVersion=5, minorVersion=12), raising=False)
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.setattr(slicer.util, "pip_install", lambda *args: calls.append(("pip_install", args)), raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *args, **kwargs: True, raising=False)
    return calls


def pretend_installed(module, monkeypatch, **versions):
    real = module.metadata.version
    monkeypatch.setattr(module.metadata, "version", lambda name: versions.get(name) or real(name))


@pytest.mark.parametrize("package, old, fix", [
    ("torch", "2.4.1+cu121", 'torchVersionRequirement=">=2.5"'),
    ("transformers", "4.55.2", 'slicer.util.pip_install("transformers>=4.56")'),
])
def test_too_old_torch_or_transformers_is_refused_with_the_fix(module, installs, monkeypatch, caplog, package, old, fix):
    pretend_installed(module, monkeypatch, **{package: old})
    logic = module.R1Seg3DSlicerLogic(session=engine.R1SegSession())
    assert not logic.ensureEngineInstalled(interactive=False)
    assert f"{package} {old} is too old" in caplog.text and fix in caplog.text
    assert installs == []


def test_old_slicer_is_refused_and_current_versions_pass(module, installs, monkeypatch):
    logic = module.R1Seg3DSlicerLogic(session=engine.R1SegSession())
    assert logic.versionProblems() == []  # this environment: torch 2.13, transformers 5.x
    monkeypatch.setattr(slicer, "app", SimpleNamespace(majorVersion=5, minorVersion=8))
    (problem,) = logic.versionProblems()
    assert "5.10 or newer" in problem and "download.slicer.org" in problem
    assert not logic.ensureEngineInstalled(interactive=False) and installs == []


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
    volume_node = scene.add_volume_node(headless.scene, __import__("numpy").zeros((4, 5, 6), "int16"),
                                        (1, 1, 1), (0, 0, 0), __import__("numpy").eye(3), "ct")
    mask = __import__("numpy").ones((4, 5, 6), "uint8")
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


# ---- packaging ----------------------------------------------------------------------------------


def cmake_engine_files(tmp_path):
    """The r1seg_core files the top-level CMakeLists.txt installs, evaluated by CMake itself: its glob and
    list commands run in script mode (the rest of the file needs a Slicer build tree)."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    text = (REPO / "CMakeLists.txt").read_text()
    start = text.index("file(GLOB_RECURSE _r1seg_core_scripts")
    # CONFIGURE_DEPENDS (re-glob at build time) is refused in script mode and changes nothing here.
    rules = text[start:text.index("ctkMacroCompilePythonScript(", start)].replace(" CONFIGURE_DEPENDS", "")
    script = (f'set(CMAKE_CURRENT_SOURCE_DIR "{REPO.as_posix()}")\n{rules}\n'
              'foreach(f IN LISTS _r1seg_core_scripts _r1seg_core_resources)\n  message("FILE ${f}")\nendforeach()\n')
    script_path = tmp_path / "install_rules.cmake"
    script_path.write_text(script)
    output = subprocess.run([cmake, "-P", str(script_path)], capture_output=True, text=True, timeout=60)
    assert output.returncode == 0, output.stderr
    return [line[5:] for line in output.stderr.splitlines() if line.startswith("FILE ")]


def test_the_packaged_engine_holds_the_default_model_the_sample_ct_and_its_data(tmp_path):
    files = cmake_engine_files(tmp_path)
    tmp_path = tmp_path / "installed"
    # Whatever the default model folder holds now (it is replaced when a model is retrained), all of it ships.
    engine_dir = REPO / "r1seg_core"
    data = [path.relative_to(REPO).as_posix() for path in (*(engine_dir / "data").rglob("*"), *engine_dir.rglob("*.json"))
            if path.is_file() and "__pycache__" not in path.parts]
    assert set(data) <= set(files), sorted(set(data) - set(files))
    for required in ("r1seg_core/data/sample_ct.nii.gz", "r1seg_core/data/default_model/config.json",
                     "r1seg_core/data/default_model/model.safetensors", "r1seg_core/vocabulary/structures.json"):
        assert required in files

    # The installed layout, and what the extension reads from it.
    for path in files:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / path, tmp_path / path)
    headless = scene.create_headless_scene()
    volume_node = headless.volumes_logic.AddArchetypeVolume(str(tmp_path / "r1seg_core/data/sample_ct.nii.gz"), "ct")
    assert volume_node is not None and scene.volume_grid_shape(volume_node) == (112, 101, 122)
    from r1seg_core.vocabulary import _load_vocabulary_from

    assert len(_load_vocabulary_from(tmp_path / "r1seg_core/vocabulary").structures) == len(STRUCTURES)
