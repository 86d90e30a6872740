"""The one rule that decides, per target, what an answer says: present, absent or not trained.

Everything a user or a program reads about a target follows from its `Decision`: the answer's text
(`answer_text.py`), the segment written (empty unless present), the JSON `status`, the Slicer segment and the
provenance record. Nothing else judges presence.

The rule, in order:
1. `not_trained`: the model's config lists the structures it was trained to segment (`known_structures`) and the
   target is not one of them. The model is not run for it: a name filter, not vision, so it is counted apart.
2. `present`: the fused mask of the windows holds at least the model's presence volume (`presence_min_ml`, set on
   training patients; without one, any voxel). The windows' answers only decide which windows add a mask: a
   window that answers "no" adds nothing, so it cannot erase what its neighbours found.
3. `absent` otherwise, and the segment is emptied.
The whole-CT answer never overrules the image: where it disagrees, the decision stands and the text says so once.
"""
from __future__ import annotations

from dataclasses import dataclass

PRESENT, ABSENT, NOT_TRAINED = "present", "absent", "not_trained"
STATUSES = (PRESENT, ABSENT, NOT_TRAINED)


@dataclass(frozen=True)
class Evidence:
    """What the model showed about one target in this CT."""
    name: str
    marked_ml: float                      # volume of the fused mask (probability >= the threshold), before deciding
    said: bool | None = None              # the whole-CT answer: found it (True), said "no" (False), no claim (None)
    windows_positive: int = 0             # windows whose answer gave it a mask
    windows: int = 0                      # windows asked


@dataclass(frozen=True)
class Decision:
    evidence: Evidence
    status: str
    min_ml: float                         # the presence volume the rule used

    @property
    def name(self) -> str:
        return self.evidence.name

    @property
    def present(self) -> bool:
        return self.status == PRESENT

    @property
    def overrules_global_answer(self) -> bool:
        return overrules(self.status, self.evidence.said)


def overrules(status: str, said: bool | None) -> bool:
    """The whole-CT answer claimed the opposite of the decision (only trained targets are compared)."""
    return status != NOT_TRAINED and said is not None and said != (status == PRESENT)


def is_trained(name: str, known_structures: list[str] | None) -> bool:
    return known_structures is None or name in known_structures


def presence_min_ml(name: str, setting: float | dict[str, float] | None) -> float:
    """The model's presence volume for one target: one number for all, one per name, or none (0)."""
    if setting is None:
        return 0.0
    if isinstance(setting, dict):
        return float(setting.get(name, 0.0))
    return float(setting)


def decide(evidence: Evidence, known_structures: list[str] | None = None,
           min_ml: float | dict[str, float] | None = None) -> Decision:
    threshold = presence_min_ml(evidence.name, min_ml)
    if not is_trained(evidence.name, known_structures):
        return Decision(evidence, NOT_TRAINED, threshold)
    present = evidence.marked_ml > 0 and evidence.marked_ml >= threshold
    return Decision(evidence, PRESENT if present else ABSENT, threshold)
