"""The bridge between the scene and the R1Seg3D engine, shared by the module's Logic and batch.py.

Split by thread, because the GUI runs the middle step on a worker thread:
  main thread    `volume_from_node`                          (reads MRML)
  any thread     `conversation_for`, `ask`                   (model only, no MRML, no Qt)
  main thread    `write_answer`                              (writes MRML)
`process` chains the three for scripts and tests.

`r1seg_core` is imported only when a question is actually asked, so that importing the Slicer
module stays cheap and works before the engine's dependencies are installed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from . import scene
from .chat import FoundTarget


@dataclass(frozen=True)
class AskOptions:
    """Advanced settings of one question; None means "the model's own default"."""

    model_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    overlap: float | None = None
    loops: int | None = None


def _default_predictor_factory(model_dir, device, dtype):
    from r1seg_core.inference.predictor import Predictor

    return Predictor(model_dir=model_dir, device=device, dtype=dtype)


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
            message = "Out of memory. Crop the volume (Crop Volume module) and ask again."
        else:
            message = "Out of memory. Try the CPU device, or crop the volume (Crop Volume module) and ask again."
        if options is not None and _may_run_float32_on_cpu(options) and "bfloat16" not in message:
            message += " On the CPU, bfloat16 precision (Advanced) halves the memory the model needs."
        return message
    if isinstance(error, engine_errors):
        return str(error)
    if isinstance(error, ValueError):
        return str(error)
    return f"Unexpected error ({type(error).__name__}: {error}). The full traceback is in the Python console."


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
        return (options.model_dir or None, options.device, options.dtype)

    def _needs_loading(self, options: AskOptions) -> bool:
        return self._predictor is None or self._loaded_key != self._cache_key(options)

    def predictor(self, options: AskOptions):
        """Load the model once per (folder, device, precision) and keep it."""
        key = self._cache_key(options)
        with self._predictor_lock:
            if self._needs_loading(options):
                self._predictor = None  # let the old weights go before the new ones load
                self._predictor = self._predictor_factory(*key)
                self._loaded_key = key
            return self._predictor

    def ask(self, volume, question: str, options: AskOptions, conversation=None, progress=None, cancel=None):
        if progress is not None and self._needs_loading(options):
            progress(0, 0, "Loading the model")  # the first question waits for the weights
        predictor = self.predictor(options)
        # Unset settings are left out rather than passed as None, so the predictor applies its own
        # defaults (None is not a valid overlap).
        tuning = {name: value for name, value in (("overlap", options.overlap), ("loops", options.loops)) if value is not None}
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

    def write_answer(self, volume_node, result) -> tuple[scene.SceneChange | None, list[FoundTarget]]:
        """Write every non-empty target mask as a new segment; empty ones are listed, not written."""
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
        for entry, segment_id, segment_name in zip(written, change.segment_ids, change.segment_names):
            # The segment's actual name, e.g. "liver (2)" when the liver was asked for before.
            entry.name = segment_name
            entry.segment_id = segment_id
            entry.segmentation_node_id = change.segmentation_node_id
        return change, found

    # ---- all of it, blocking -------------------------------------------------------------

    def process(self, volume_node, question: str, options: AskOptions = AskOptions(), progress=None, cancel=None):
        """Ask about a volume node and write the answer; returns (result, change, found targets)."""
        volume = self.volume_from_node(volume_node)
        conversation = self.conversation_for(volume_node.GetID())
        result = self.ask(volume, question, options, conversation, progress, cancel)
        change, found = self.write_answer(volume_node, result)
        return result, change, found
