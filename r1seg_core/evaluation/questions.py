"""The questions asked about one case, built from its label, the vocabulary and the held-out phrasings.

Kinds:
  explicit              a present target by name, in a phrasing training never uses;
  implicit              a present target by one of its held-out descriptions (never used in training);
  multi                 two or three present targets in one question;
  absent_in_region      an annotated target the label does not contain, in a body region the scan covers;
  absent_out_of_region  a vocabulary target of a body region the scan does not cover;
  custom                the data list's own questions.
The choice of phrasing, description and grouping is random but seeded by the case id, so a resumed or sharded
run asks exactly the same questions.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from ..prompting import HELD_OUT_EXPLICIT_QUESTIONS, HELD_OUT_IMPLICIT_QUESTIONS
from ..vocabulary import load_vocabulary
from .cases import EvalCase
from .regions import absent_targets

KINDS = ("explicit", "implicit", "multi", "absent_in_region", "absent_out_of_region", "custom")
ABSENT_KINDS = ("absent_in_region", "absent_out_of_region")
# Kinds whose target occurs in several questions of a case get a number in their tag.
_NUMBERED_KINDS = ("multi", "custom")


@dataclass(frozen=True)
class Question:
    kind: str
    tag: str                       # unique within the case: the kind, or the kind and a number (multi2)
    text: str
    targets: tuple[str, ...]


def _joined(names) -> str:
    """'liver' / 'liver and the spleen' / 'liver, the spleen and the stomach': each name keeps its article."""
    names = list(names)
    return names[0] if len(names) == 1 else ", the ".join(names[:-1]) + " and the " + names[-1]


def _explicit(rng: random.Random, names) -> str:
    return rng.choice(HELD_OUT_EXPLICIT_QUESTIONS).format(target=_joined(names))


def _groups_of_two_and_three(rng: random.Random, present: list[str]) -> list[tuple[str, ...]]:
    shuffled = rng.sample(present, len(present))
    groups, size = [], 2
    while len(shuffled) >= size:
        groups.append(tuple(shuffled[:size]))
        shuffled, size = shuffled[size:], 5 - size      # pairs and triples in turn
    return groups


def build_questions(case: EvalCase, present: list[str], kinds=KINDS, max_per_kind: int | None = None,
                    targets: tuple[str, ...] | None = None, unnamed_foreground: bool = False) -> list[Question]:
    """Every question of the asked kinds about `case` whose present targets are `present` (vocabulary order).

    `targets` (e.g. what a model was trained on) limits the present and annotated-absent structures asked about;
    all of `present` still decides which body regions the scan covers, and out-of-region questions may name any
    vocabulary structure, known to the model or not.

    Absent questions name only structures known to be absent. `unnamed_foreground`: the label has values its
    `classes` do not name, which may be structures of any region, so no region is known to be outside the scan and
    no out-of-region question is asked (annotated structures with no voxels are still known absent).
    """
    vocabulary = load_vocabulary()
    rng = random.Random(zlib.crc32(case.case_id.encode()))   # str hash() differs between processes
    inside, outside = absent_targets(present, case.annotated, [s.name for s in vocabulary.structures])
    if unnamed_foreground:
        outside = []
    if targets is not None:
        present = [name for name in present if name in targets]
        inside = [name for name in inside if name in targets]
    by_kind: dict[str, list[tuple[str, tuple[str, ...]]]] = {
        "explicit": [(_explicit(rng, [name]), (name,)) for name in present],
        "implicit": [],
        "multi": [(_explicit(rng, group), group) for group in _groups_of_two_and_three(rng, present)],
        "absent_in_region": [(_explicit(rng, [name]), (name,)) for name in inside],
        "absent_out_of_region": [(_explicit(rng, [name]), (name,)) for name in outside],
        "custom": [(q.text, q.targets) for q in case.questions],
    }
    for name in present:
        descriptions = vocabulary.get(name).held_out_descriptions
        if descriptions:
            description = rng.choice(descriptions).rstrip(".") + "."
            by_kind["implicit"].append((rng.choice(HELD_OUT_IMPLICIT_QUESTIONS).format(description=description), (name,)))
    questions = []
    for kind in KINDS:
        if kind not in kinds:
            continue
        chosen = by_kind[kind]
        if max_per_kind is not None and len(chosen) > max_per_kind:
            chosen = rng.sample(chosen, max_per_kind)
        for number, (text, asked) in enumerate(chosen, start=1):
            tag = f"{kind}{number}" if kind in _NUMBERED_KINDS else kind
            questions.append(Question(kind, tag, text, asked))
    return questions
