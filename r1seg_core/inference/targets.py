"""What a question is about: the structures it names, or the ones the model's answer names.

Only canonical vocabulary structures ever become targets. A word the model's answer uses for a target that names
no structure ("The bile is [SEG].") is kept as `not_understood`, so the answer can say what it did not understand,
and never becomes a segment.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..prompting import negative_answer, targets_named_absent, targets_named_in_answer

# How a question points back at the previous answer's targets, when it names none ("segment it again").
_REFERS_BACK = re.compile(r"\b(it|its|them|they|those|these|same)\b", re.IGNORECASE)
# "Sorry, there is no such target.": the unnamed negative answer names nothing, so it is not a word misunderstood.
_UNNAMED_NEGATIVE = targets_named_absent(negative_answer([]))


@dataclass
class Targets:
    """What one question is about, and what the whole-CT answer said of each target."""
    names: list[str]
    said: dict[str, bool] = field(default_factory=dict)   # the whole-CT answer had a [SEG] for it / said "no"
    seg_names: list[str | None] = field(default_factory=list)  # the target each [SEG] of a free answer stands for
    not_understood: list[str] = field(default_factory=list)


def canonical(vocabulary, name: str | None) -> str | None:
    structure = vocabulary.lookup(name) if name else None
    return structure.name if structure is not None else None


def named_in_question(vocabulary, question: str) -> list[str]:
    return [structure.name for structure in vocabulary.find_in_text(question)]


# What asks for a structure by name: a request verb, or a question that starts "is/are/does ...", or "now the X".
# The names in the rest of that clause are requested; names elsewhere describe the target ("the organ that sits
# above the right kidney"), so an implicit question is not mistaken for a request about its landmarks.
_REQUEST = re.compile(
    r"\b(?:segment|segmentations? of|outline|highlight|show(?: me)?|delineate|find|locate|mark|contour|label|"
    r"where (?:is|are))\b|(?:^|[.?!]\s*)(?:is|are|does|do|can you see|now|and|also|what about|how about)\b",
    re.IGNORECASE)
_CLAUSE_END = re.compile(r"[.?!;:]")


def requested_in_question(vocabulary, question: str) -> list[str]:
    """The structures a question asks for by name, in order: those named in a clause that a request opens."""
    requested: list[str] = []
    for cue in _REQUEST.finditer(question):
        end = _CLAUSE_END.search(question, cue.end())
        clause = question[cue.end(): end.start() if end else len(question)]
        requested += [name for name in named_in_question(vocabulary, clause) if name not in requested]
    return requested


def refers_back(question: str) -> bool:
    return bool(_REFERS_BACK.search(question))


def read_free_answer(vocabulary, text: str) -> Targets:
    """The structures a generated answer names: before a [SEG] (found) or after "there is no" (not there)."""
    said: dict[str, bool] = {}
    seg_names, unknown = [], []
    for name in targets_named_in_answer(text):
        structure = canonical(vocabulary, name)
        seg_names.append(structure)
        if structure is not None:
            said[structure] = True
        elif name and name not in unknown:
            unknown.append(name)
    for name in targets_named_absent(text):
        structure = canonical(vocabulary, name)
        if structure is not None:
            said.setdefault(structure, False)
        elif name not in unknown and name not in _UNNAMED_NEGATIVE:
            unknown.append(name)
    return Targets(list(said), said, seg_names, unknown)
