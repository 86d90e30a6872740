"""Follow-up questions about the last answer's targets, answered from the stored masks without segmenting again.

"How big is it?", "Which side is it on?", "Is it bigger than normal?" read the conversation's decided masks, so a
volume the user was given never changes within a conversation. A question that names a structure the conversation
has not answered about ("Now the spleen.") is not a follow-up: the model segments it.
"""
from __future__ import annotations

import re

import numpy as np

from .decision import NOT_TRAINED, PRESENT
from .result import TargetResult
from .targets import named_in_question, refers_back

SIZE, SIDE, NORMAL = "size", "side", "normal"
_INTENTS = (   # the first that matches wins: "is it bigger than normal?" asks for a comparison, not a size
    (NORMAL, re.compile(r"\b(normal|enlarged|usual|typical|too (big|large|small)|(bigger|larger|smaller) than)\b", re.I)),
    (SIDE, re.compile(r"\b((which|what) side|left or right|right or left|laterality|which half)\b", re.I)),
    (SIZE, re.compile(r"\b(how (big|large|much|many)|size|volume|measure)", re.I)),
)
# A centre closer than this to the body's midline is "in the midline".
MIDLINE_MM = 10.0
# Voxels above this are the body, whose centre is the midline (air and the table's foam are below it).
BODY_HU = -500.0
# Adult volumes on CT, for "is it bigger than normal?". Only structures with a published CT reference range.
REFERENCE_ML = {
    "spleen": (107.2, 314.5, "Prassopoulos et al., Eur Radiol 1997;7(2):246-248: the range measured in 140 adults without splenic disease"),
}


def intent(question: str) -> str | None:
    for kind, pattern in _INTENTS:
        if pattern.search(question):
            return kind
    return None


def follow_up_targets(question: str, conversation, vocabulary) -> list | None:
    """The stored targets a follow-up asks about, or None when the question is not one (or nothing is stored).

    A follow-up names only structures already answered ("how large is the spleen?") or points back at the last
    ones ("is it enlarged?"): an implicit question that happens to say "enlarged" is not one.
    """
    if conversation is None or not conversation.stored or intent(question) is None:
        return None
    names = named_in_question(vocabulary, question)
    if not names and refers_back(question):
        names = conversation.last_targets()
    if not names or any(name not in conversation.stored for name in names):
        return None
    return [conversation.stored[name] for name in names]


def answer_follow_up(question: str, stored: list, volume) -> tuple[str, list[TargetResult]]:
    """The text, and the stored targets as results (their masks byte for byte the ones answered before)."""
    kind = intent(question)
    results = [TargetResult(s.name, s.mask(), None, s.volume_ml, s.voxel_count, status=s.status) for s in stored]
    parts = [_about(kind, target, volume) for target in results]
    parts.append("(From the segments already given in this conversation; nothing was segmented again.)")
    return " ".join(parts), results


def _about(kind: str, target: TargetResult, volume) -> str:
    name = target.name
    if target.status == NOT_TRAINED:
        return f"This model was not trained to segment the {name}, so there is nothing to measure."
    if target.status != PRESENT:
        return f"There is no {name} in this scan, so there is nothing to measure."
    if kind == SIDE:
        return _side(target, volume)
    if kind == NORMAL:
        return _against_reference(target)
    return f"The {name} measures {target.volume_ml:.1f} mL ({target.voxel_count} voxels)."


def _physical_x(volume, indices_zyx: np.ndarray) -> np.ndarray:
    """LPS x (towards the patient's left) of voxel indices (N, 3) in (z, y, x) order."""
    ijk = indices_zyx[:, ::-1] * np.asarray(volume.spacing)
    return volume.origin[0] + ijk @ np.asarray(volume.direction)[0]


def _side(target: TargetResult, volume) -> str:
    body = np.argwhere(volume.array[::2, ::4, ::4] > BODY_HU) * np.array([2, 4, 4])
    midline = float(np.median(_physical_x(volume, body))) if len(body) else float(
        _physical_x(volume, np.array([[(n - 1) / 2 for n in volume.shape]]))[0])
    x = _physical_x(volume, np.argwhere(target.mask > 0)) - midline
    offset, left = float(x.mean()), float((x > 0).mean())
    if abs(offset) < MIDLINE_MM:
        where = "in the midline"
    else:
        where = f"on the patient's {'left' if offset > 0 else 'right'} side"
    return (f"The {target.name} ({target.volume_ml:.1f} mL) lies {where}: its centre is {abs(offset):.0f} mm "
            f"{'left' if offset > 0 else 'right'} of the body's midline, and {100 * left:.0f} % of it is on the "
            f"patient's left.")


def _against_reference(target: TargetResult) -> str:
    name, volume_ml = target.name, target.volume_ml
    if name not in REFERENCE_ML:
        return (f"This project has no reference volume for the {name}; its segment measures {volume_ml:.1f} mL. "
                "This model's masks are not a clinical measurement.")
    low, high, source = REFERENCE_ML[name]
    verdict = "above" if volume_ml > high else "below" if volume_ml < low else "within"
    return (f"The {name} measures {volume_ml:.1f} mL, {verdict} the adult range of {low:.0f}-{high:.0f} mL on CT "
            f"({source}). This model's masks are not a clinical measurement.")
