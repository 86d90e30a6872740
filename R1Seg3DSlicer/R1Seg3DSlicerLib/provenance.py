"""Where each answer's segments came from, kept in the scene beside them (MRML only, plus the standard library).

One record per answer: the model (folder, name and the SHA-256 of its config.json), the question, the answer text,
the inference settings, the time taken, the date and the segments the answer added. A record is a
vtkMRMLTextNode holding the record as JSON, and the segmentation node lists its records, oldest first, under the
node-reference role RECORD_REFERENCE_ROLE. Both are part of MRML, so they are saved and loaded with the scene
(a long record goes to a .txt file that the scene's storage writes beside it) and survive node-ID remapping on
import. A record is only ever added: a new answer appends its own node and never touches earlier ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .i18n import tr as _
from .scene import place_in_same_study

RECORD_REFERENCE_ROLE = "R1Seg3DAnswerRecord"
# Marks a text node as an R1Seg3D answer record (the value is the record format's version).
RECORD_ATTRIBUTE = "R1Seg3D.AnswerRecord"
RECORD_FORMAT = "1"


@dataclass(frozen=True)
class AnswerRecord:
    """The provenance of one answer. `overlap` and `loops` are None when the model's own defaults were used."""

    question: str
    answer: str
    model_folder: str
    model_name: str
    config_sha256: str      # of the model's config.json; empty when the model is not readable here (a remote server)
    profile: str            # the inference profile that produced the answer ("project", "original")
    overlap: float | None
    loops: int | None
    sliding_window: bool
    device: str
    precision: str
    elapsed_s: float
    date: str               # ISO 8601 with the UTC offset
    volume: str             # the name of the CT volume node
    segment_ids: tuple[str, ...] = ()
    segment_names: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> AnswerRecord:
        values = json.loads(text)
        values["segment_ids"] = tuple(values["segment_ids"])
        values["segment_names"] = tuple(values["segment_names"])
        return cls(**values)


def add_record(segmentation_node, record: AnswerRecord):
    """Store `record` as a new text node referenced by the segmentation (after its earlier records); returns it."""
    scene = segmentation_node.GetScene()
    number = segmentation_node.GetNumberOfNodeReferences(RECORD_REFERENCE_ROLE) + 1
    text_node = scene.AddNewNodeByClass(
        "vtkMRMLTextNode", scene.GenerateUniqueName(f"{segmentation_node.GetName()} answer {number}"))
    text_node.SetText(record.to_json())
    text_node.SetAttribute(RECORD_ATTRIBUTE, RECORD_FORMAT)
    if scene.GetUndoFlag():  # scene undo (see scene.py) takes the record back with the answer's segments
        text_node.SetUndoEnabled(True)
    segmentation_node.AddNodeReferenceID(RECORD_REFERENCE_ROLE, text_node.GetID())
    place_in_same_study(text_node, segmentation_node)
    return text_node


def records(segmentation_node) -> list[AnswerRecord]:
    """The segmentation's answer records, oldest first (a removed or foreign text node is skipped)."""
    found = []
    for index in range(segmentation_node.GetNumberOfNodeReferences(RECORD_REFERENCE_ROLE)):
        text_node = segmentation_node.GetNthNodeReference(RECORD_REFERENCE_ROLE, index)
        if text_node is not None and text_node.GetAttribute(RECORD_ATTRIBUTE) == RECORD_FORMAT:
            found.append(AnswerRecord.from_json(text_node.GetText()))
    return found


def record_for_segment(segmentation_node, segment_id: str) -> AnswerRecord | None:
    """The record of the answer that added this segment, or None (a segment the user made)."""
    return next((record for record in reversed(records(segmentation_node)) if segment_id in record.segment_ids), None)


def describe(record: AnswerRecord) -> str:
    """The record as the panel shows it."""
    default = _("model default")
    lines = [
        _("Question: {question}").format(question=record.question),
        _("Answer: {answer}").format(answer=record.answer),
        _("Segments: {names}").format(names=", ".join(record.segment_names)),
        _("Model: {name} ({folder})").format(name=record.model_name, folder=record.model_folder),
        _("Model config SHA-256: {digest}").format(digest=record.config_sha256 or _("not available")),
        _("Profile: {profile}; overlap: {overlap}; refinement loops: {loops}; sliding window: {sliding}").format(
            profile=record.profile, overlap=default if record.overlap is None else record.overlap,
            loops=default if record.loops is None else record.loops,
            sliding=_("on") if record.sliding_window else _("off")),
        _("Device: {device}; precision: {precision}").format(device=record.device, precision=record.precision),
        _("Answered on {date} in {seconds:.1f} s (volume {volume})").format(
            date=record.date, seconds=record.elapsed_s, volume=record.volume),
    ]
    return "\n".join(lines)
