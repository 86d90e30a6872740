"""What the user reads: one statement per target, written from its decision, so the text cannot contradict the
segment or the JSON status. Where the whole-CT answer said otherwise, one plain sentence says the rule decided.

A generated answer ("The pancreas is [SEG], the gland behind the stomach.") leads the text, each [SEG] shown as
the segment it made, only when it agrees with every decision; otherwise the decisions speak alone and the model's
words stay in the result's `model_text`.
"""
from __future__ import annotations

from ..prompting import SEG_TOKEN
from .decision import NOT_TRAINED, PRESENT, overrules
from .targets import Targets


def segment_reference(name: str) -> str:
    return f"[segment: {name}]"


def statement(target, short: bool = False) -> str:
    """One target's decision in words (`short`: after a model answer that already named it)."""
    name = target.name
    if target.status == PRESENT:
        if short:
            return f"{name}: {target.volume_ml:.1f} mL."
        return f"The {name} is {segment_reference(name)}: {target.volume_ml:.1f} mL."
    if target.status == NOT_TRAINED:
        return f"This model was not trained to segment the {name}; its segment is empty."
    marked = target.marked_ml or 0.0
    why = (f" (the decoder marked {marked:.1f} mL, under the {target.presence_min_ml:.1f} mL this model needs to call "
           f"it present)" if marked > 0 else "")
    return f"There is no {name} in this scan{why}; its segment is empty."


def overruled(target, windows: int) -> str:
    """The sentence for a target whose whole-CT answer said the opposite of the decision."""
    name = target.name
    if target.status == PRESENT:
        return (f"The whole-CT answer denied the {name}, but {target.windows_positive} of {windows} windows found it, "
                "so it is reported as present.")
    marked = target.marked_ml or 0.0
    if marked > 0:
        return (f"The whole-CT answer found the {name}, but the windows marked only {marked:.1f} mL, under this model's "
                f"{target.presence_min_ml:.1f} mL, so it is reported as absent.")
    return f"The whole-CT answer found the {name}, but no window marked any of it, so it is reported as absent."


def not_understood(words: list[str]) -> str:
    quoted = ", ".join(f"'{word}'" for word in words)
    return (f"The answer named {quoted}, which is not a structure this project knows, so nothing was segmented for "
            f"it; name an organ, e.g. 'segment the liver'.")


def nothing_understood(question: str) -> str:
    return (f"No structure this model can segment was found in '{question}', so nothing was segmented; name one, "
            "e.g. 'segment the liver'.")


def _agrees(targets: Targets, results) -> bool:
    """A free answer may be shown when each [SEG] stands for a present target and each "no X" for one that is not."""
    status = {t.name: t.status for t in results}
    if any(name is None or status.get(name) != PRESENT for name in targets.seg_names):
        return False
    return all((status.get(name) == PRESENT) == said for name, said in targets.said.items() if name in status)


def _shown(model_text: str, seg_names: list[str]) -> str:
    """The model's text with each [SEG] replaced by the segment it made."""
    parts = model_text.split(SEG_TOKEN)
    return parts[0] + "".join(segment_reference(seg_names[k]) + part for k, part in enumerate(parts[1:]))


def compose_answer(results, targets: Targets, windows: int, question: str, free_text: str = "") -> str:
    """The answer's text from the decisions (`results`: TargetResult, in the order asked)."""
    lead = free_text and not targets.not_understood and _agrees(targets, results)
    parts = [_shown(free_text, targets.seg_names)] if lead else []
    for target in results:
        parts.append(statement(target, short=bool(lead)))
        if overrules(target.status, target.global_answer):
            parts.append(overruled(target, windows))
    if targets.not_understood:
        parts.append(not_understood(targets.not_understood))
    if not results and not targets.not_understood:
        parts.append(nothing_understood(question))
    return " ".join(parts)

