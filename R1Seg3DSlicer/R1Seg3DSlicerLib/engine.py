"""The bridge between the scene and the R1Seg3D engine, shared by the module's Logic and batch.py.

Split by thread, because the GUI runs the middle step on a worker thread:
  main thread    `volume_from_node`                          (reads MRML)
  any thread     `conversation_for`, `ask`                   (model only, no MRML, no Qt)
  main thread    `write_answer`                              (writes MRML)
`process` chains the three for scripts and tests. `answer_record` describes an answer for its provenance
record (provenance.py), which `write_answer` stores beside the answer's segments.

`r1seg_core` is imported only when a question is actually asked, so that importing the Slicer
module stays cheap and works before the engine's dependencies are installed.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from . import provenance, scene
from .chat import FoundTarget
from .i18n import tr as _


# ---- what the engine needs installed (the module checks it before the first question, batch.py before it runs) ----

# 2.5: the engine catches torch.OutOfMemoryError, which older torch does not have.
TORCH_REQUIREMENT = ">=2.5"
# Slicer 5.10 (Python 3.12) is the oldest supported release: Slicer 5.8's Python 3.9 cannot install the
# transformers the engine needs (>= 4.56, see Resources/requirements.txt). pyproject.toml's floor is Python 3.10.
MINIMUM_SLICER_VERSION = (5, 10)
MINIMUM_PYTHON_VERSION = (3, 10)
REQUIREMENTS_PATH = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"


def requirement_lines() -> list[str]:
    """The requirements of REQUIREMENTS_PATH, comments and blank lines left out."""
    with open(REQUIREMENTS_PATH, encoding="utf-8") as requirements_file:
        lines = [line.split("#", 1)[0].strip() for line in requirements_file]
    return [line for line in lines if line]


def release_numbers(version: str) -> tuple:
    """(2, 5, 1) from "2.5.1+cu124" or "4.56.0.dev0": floors compare release numbers only."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def name_and_floor(requirement: str):
    """("transformers", ">=4.56") from "transformers>=4.56"; (name, None) without a lower bound."""
    match = re.match(r"([A-Za-z0-9._-]+)\s*(>=\s*[0-9.]+)?", requirement)
    return match.group(1), (match.group(2).replace(" ", "") if match.group(2) else None)


def installed_version(name: str):
    """The installed version of a distribution, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_problems(slicer_version: tuple[int, int] | None, in_slicer: bool = True) -> list[str]:
    """One message per reason the engine cannot run here (Slicer or Python too old, an installed package below its
    floor), each naming the fix: Slicer's Python console when `in_slicer`, else pip. `slicer_version` is None outside
    Slicer. Packages that are missing are not problems: the module's installer adds them. Installs nothing."""
    python_version = sys.version_info[:2]
    if (slicer_version is not None and slicer_version < MINIMUM_SLICER_VERSION) or python_version < MINIMUM_PYTHON_VERSION:
        if slicer_version is None:
            return [_("R1Seg3D needs Python {python} or newer; this is Python {thisPython}.").format(
                python="%d.%d" % MINIMUM_PYTHON_VERSION, thisPython="%d.%d" % python_version)]
        return [_("R1Seg3D needs 3D Slicer {slicer} or newer with Python {python} or newer; this is Slicer"
                  " {thisSlicer} with Python {thisPython}. Install a current Slicer from"
                  " https://download.slicer.org.").format(
            slicer="%d.%d" % MINIMUM_SLICER_VERSION, python="%d.%d" % MINIMUM_PYTHON_VERSION,
            thisSlicer="%d.%d" % slicer_version, thisPython="%d.%d" % python_version)]
    problems = []
    for name, floor in [("torch", TORCH_REQUIREMENT), *map(name_and_floor, requirement_lines())]:
        installed = installed_version(name)
        if installed is None or floor is None or release_numbers(installed) >= release_numbers(floor.lstrip(">=")):
            continue
        if not in_slicer:
            fix = _("Update it: pip install \"{requirement}\".").format(requirement=name + floor)
        elif name == "torch":
            fix = _("Update it with the PyTorch extension: in the Python console run"
                    " PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,"
                    " torchVersionRequirement=\"{floor}\"), then restart Slicer.").format(floor=floor)
        else:
            fix = _("Update it in the Python console: slicer.util.pip_install(\"{requirement}\"),"
                    " then restart Slicer.").format(requirement=name + floor)
        problems.append(_("{name} {installed} is too old; R1Seg3D needs {name}{floor}.").format(
            name=name, installed=installed, floor=floor) + " " + fix)
    return problems


@dataclass(frozen=True)
class AskOptions:
    """Advanced settings of one question; None means "the model's own default"."""

    model_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    overlap: float | None = None
    loops: int | None = None
    profile: str = "auto"          # inference profile (r1seg_core/inference/profiles.py); auto: the model's
    sliding_window: bool = True    # False: the whole CT resized to one window


def _default_predictor_factory(model_dir, device, dtype, profile="auto"):
    from r1seg_core.inference.predictor import Predictor

    return Predictor(model_dir=model_dir, device=device, dtype=dtype, profile=profile)


def _default_vocabulary_loader():
    from r1seg_core.vocabulary import load_vocabulary

    return load_vocabulary()


def _default_conversation_factory():
    from r1seg_core.inference.conversation import Conversation

    return Conversation()


def _plain_code(code) -> scene.Code | None:
    if code is None:
        return None
    return scene.Code(str(code.scheme), str(code.value), str(code.meaning))


def segment_style(name: str, vocabulary) -> tuple[tuple[int, int, int], scene.SegmentTerminology | None]:
    """Colour and SNOMED terminology for a target name, from the project vocabulary.

    The lookup is the vocabulary's (case-insensitive, synonyms, side-specific); a name it does not
    know keeps a neutral colour and no terminology rather than a guessed code.
    """
    structure = vocabulary.lookup(name) if vocabulary is not None else None
    if structure is None:
        return scene.FALLBACK_COLOR, None
    terminology = scene.SegmentTerminology(
        category=_plain_code(structure.category),
        type=_plain_code(structure.type),
        type_modifier=_plain_code(structure.type_modifier),
    )
    color = tuple(int(channel) for channel in structure.color)
    return color, terminology


def _may_run_float32_on_cpu(options: AskOptions) -> bool:
    # Auto precision is float32 on the CPU, and the auto device is the CPU on a machine without a
    # GPU; telling which machine this is would import torch on the main thread.
    return options.dtype != "bfloat16" and options.device != "cuda"


def describe_error(error: BaseException, options: AskOptions | None = None) -> str:
    """A message for the conversation: the engine's own errors are written for users and are shown
    as they are; anything else is a bug, so it says where the details went. With the question's
    `options`, running out of memory in float32 on the CPU also points to bfloat16 precision."""
    try:
        from r1seg_core.errors import R1SegError as engine_errors
    except ImportError:
        engine_errors = ()  # isinstance(x, ()) is always False
    if isinstance(error, MemoryError):  # the engine's OutOfMemoryError too, whose text says what ran out
        if isinstance(error, engine_errors):
            message = str(error).rstrip(".") + "."
        elif options is not None and options.device == "cpu":
            message = _("Out of memory. Crop the volume (Crop Volume module) and ask again.")
        else:
            message = _("Out of memory. Try the CPU device, or crop the volume (Crop Volume module) and ask again.")
        if options is not None and _may_run_float32_on_cpu(options) and "bfloat16" not in message:
            message += " " + _("On the CPU, bfloat16 precision (Advanced) halves the memory the model needs.")
        return message
    if isinstance(error, engine_errors):
        return str(error)
    if isinstance(error, ValueError):
        return str(error)
    return _("Unexpected error ({kind}: {error}). The full traceback is in the Python console.").format(
        kind=type(error).__name__, error=error)


def model_identity(model_dir: str | None) -> tuple[str, str, str]:
    """(folder, name, SHA-256 of config.json) of a local model folder; None is the engine's default model. The
    name is the model card's, and both it and the hash are empty when the folder has no readable config.json."""
    if model_dir:
        folder = Path(model_dir).expanduser().resolve()
    else:
        from r1seg_core import default_model_path  # cheap: r1seg_core's package import loads no torch

        folder = default_model_path()
    try:
        config = (folder / "config.json").read_bytes()
    except OSError:
        return str(folder), "", ""
    try:
        name = str(json.loads(config).get("card", {}).get("name", ""))
    except ValueError:
        name = ""
    return str(folder), name, hashlib.sha256(config).hexdigest()


def answer_record(volume_node, question: str, result, options: AskOptions, elapsed_s: float,
                  model: tuple[str, str, str] | None = None) -> provenance.AnswerRecord:
    """The provenance of one answer, without its segments (write_answer adds them). `model` is (folder, name,
    config hash) when the model is not a local folder, e.g. a remote server's; else it is read from
    `options.model_dir`."""
    folder, name, digest = model or model_identity(options.model_dir)
    return provenance.AnswerRecord(
        question=question, answer=result.answer, model_folder=folder, model_name=name, config_sha256=digest,
        profile=result.profile, overlap=options.overlap, loops=options.loops, sliding_window=options.sliding_window,
        device=result.device, precision=options.dtype, elapsed_s=round(float(elapsed_s), 3),
        date=datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
        volume=volume_node.GetName() or "",
    )


class R1SegSession:
    """One user's engine state: the loaded model (reused across questions) and the conversation."""

    def __init__(self, predictor_factory=None, vocabulary_loader=None, conversation_factory=None):
        self._predictor_factory = predictor_factory or _default_predictor_factory
        self._vocabulary_loader = vocabulary_loader or _default_vocabulary_loader
        self._conversation_factory = conversation_factory or _default_conversation_factory
        self._predictor = None
        self._loaded_key = None
        self._predictor_lock = threading.Lock()
        self._vocabulary = None
        self._vocabulary_loaded = False
        self._conversation = None
        self._conversation_volume_id = None

    # ---- main thread: read ---------------------------------------------------------------

    def volume_from_node(self, volume_node):
        from r1seg_core.volume import Volume

        data = scene.volume_data_from_node(volume_node)
        return Volume(
            array=data.array, spacing=data.spacing, origin=data.origin, direction=data.direction, name=data.name
        )

    def clear_conversation(self) -> None:
        self._conversation = None
        self._conversation_volume_id = None

    # ---- any thread: the model -----------------------------------------------------------

    def conversation_for(self, volume_node_id: str):
        """The conversation about this volume; asking about another volume starts a fresh one,
        because earlier answers describe a different scan. Takes the node ID, not the node, so that
        the worker thread can call it: the first import of the engine's inference package loads
        torch, which must not freeze Slicer's main thread."""
        if self._conversation_volume_id != volume_node_id:
            self._conversation = self._conversation_factory()
            self._conversation_volume_id = volume_node_id
        return self._conversation

    @staticmethod
    def _cache_key(options: AskOptions):
        return (options.model_dir or None, options.device, options.dtype, options.profile)

    def _needs_loading(self, options: AskOptions) -> bool:
        return self._predictor is None or self._loaded_key != self._cache_key(options)

    def predictor(self, options: AskOptions):
        """Load the model once per (folder, device, precision, profile) and keep it."""
        key = self._cache_key(options)
        model_dir, device, dtype, profile = key
        with self._predictor_lock:
            if self._needs_loading(options):
                self._predictor = None  # let the old weights go before the new ones load
                # The profile is passed only when one is chosen, so scripted factories (tests, the self-test) may
                # take just (folder, device, precision).
                chosen = {} if profile == "auto" else {"profile": profile}
                self._predictor = self._predictor_factory(model_dir, device, dtype, **chosen)
                self._loaded_key = key
            return self._predictor

    def unload_model(self) -> None:
        """Drop the loaded model; its memory (GPU too) goes once no running question holds it. The next question
        loads it again."""
        with self._predictor_lock:
            self._predictor = None
            self._loaded_key = None
        gc.collect()
        torch = sys.modules.get("torch")  # never imported here: only a loaded model has memory to give back
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def ask(self, volume, question: str, options: AskOptions, conversation=None, progress=None, cancel=None):
        if progress is not None and self._needs_loading(options):
            progress(0, 0, _("Loading the model"))  # the first question waits for the weights
        predictor = self.predictor(options)
        # Unset settings are left out rather than passed as None, so the predictor applies its own
        # defaults (None is not a valid overlap).
        tuning = {name: value for name, value in (("overlap", options.overlap), ("loops", options.loops)) if value is not None}
        if not options.sliding_window:
            tuning["sliding_window"] = False
        return predictor.ask(volume, question, conversation=conversation, progress=progress, cancel=cancel, **tuning)

    # ---- main thread: write --------------------------------------------------------------

    def vocabulary(self):
        if not self._vocabulary_loaded:
            try:
                self._vocabulary = self._vocabulary_loader()
            except Exception:
                # Colours and codes are decoration; the answer's masks must still reach the scene.
                logging.exception("R1Seg3D: vocabulary could not be loaded; segments get no terminology")
                self._vocabulary = None
            self._vocabulary_loaded = True
        return self._vocabulary

    def write_answer(self, volume_node, result, record: provenance.AnswerRecord | None = None
                     ) -> tuple[scene.SceneChange | None, list[FoundTarget]]:
        """Write every non-empty target mask as a new segment; empty ones are listed, not written. With a
        `record`, the answer's provenance is stored beside its segments (an answer that wrote none keeps none)."""
        vocabulary = self.vocabulary()
        found = []
        specs = []
        written = []  # the entries of `found` that get a segment, in the order of `specs`
        for target in result.targets:
            entry = FoundTarget(target.name, float(target.volume_ml), int(target.voxel_count))
            found.append(entry)
            if target.mask is None or not target.mask.any():
                continue
            color, terminology = segment_style(target.name, vocabulary)
            specs.append(scene.SegmentSpec(target.name, target.mask, color, terminology))
            written.append(entry)

        if not specs:
            return None, found
        change = scene.write_segments(volume_node, specs)
        if record is not None:
            segmentation_node = volume_node.GetScene().GetNodeByID(change.segmentation_node_id)
            record = dataclasses.replace(record, segment_ids=change.segment_ids, segment_names=change.segment_names)
            change = dataclasses.replace(change, record_node_id=provenance.add_record(segmentation_node, record).GetID())
        for entry, segment_id, segment_name in zip(written, change.segment_ids, change.segment_names):
            # The segment's actual name, e.g. "liver (2)" when the liver was asked for before.
            entry.name = segment_name
            entry.segment_id = segment_id
            entry.segmentation_node_id = change.segmentation_node_id
        return change, found

    # ---- all of it, blocking -------------------------------------------------------------

    def process(self, volume_node, question: str, options: AskOptions = AskOptions(), progress=None, cancel=None,
                record: bool = False):
        """Ask about a volume node and write the answer, with its provenance record when `record`; returns
        (result, change, found targets)."""
        started = time.monotonic()
        volume = self.volume_from_node(volume_node)
        conversation = self.conversation_for(volume_node.GetID())
        result = self.ask(volume, question, options, conversation, progress, cancel)
        answer = answer_record(volume_node, question, result, options, time.monotonic() - started) if record else None
        change, found = self.write_answer(volume_node, result, answer)
        return result, change, found
