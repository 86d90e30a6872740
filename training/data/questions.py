"""Questions and answers for one crop, drawn with the sample's own random generator.

Answers are exactly the ones r1seg_core's predictor scores at inference (`prompting.positive_answer` /
`negative_answer`): "The liver is [SEG]." or "Sorry, there is no liver.", with one [SEG] per target. Questions
come from `prompting`'s explicit and implicit templates plus the extra kinds below.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from r1seg_core import prompting
from r1seg_core.vocabulary import load_vocabulary

from ..recipe import QuestionSettings

MULTI_TARGET_QUESTIONS = (
    "Please segment the {targets}.",
    "Can you segment the {targets} in this image?",
    "Segment the {targets}.",
    "Where are the {targets}? Please answer and segment.",
    "Could you outline the {targets} in this CT?",
)
IMPLICIT_EXISTENCE_QUESTIONS = (
    "{description} Is this structure visible in this CT?",
    "{description} Does this scan contain it?",
)


@dataclass
class QuestionAnswer:
    question: str
    answer: str
    targets: list[str]       # the structure each [SEG] of the answer stands for, in order
    about: list[str]         # the structures the question asks about, present or not


def join_targets(names: list[str]) -> str:
    """["liver", "spleen", "left kidney"] -> "liver, the spleen and the left kidney" (after a template's "the")."""
    if len(names) == 1:
        return names[0]
    return ", the ".join(names[:-1]) + " and the " + names[-1]


INSTRUCTIONS_PATH = Path(__file__).with_name("instructions.json")


@lru_cache(maxsize=1)
def instructions() -> dict:
    """Hand-written training text (instructions.json): more descriptions, synonyms and implicit question forms per
    organ, written without sight of the vocabulary's held-out descriptions or the evaluation's phrasings."""
    return json.loads(INSTRUCTIONS_PATH.read_text())


def _description(rng: random.Random, name: str, settings: QuestionSettings) -> str:
    pool = list(load_vocabulary().get(name).descriptions)
    if settings.instructions:
        pool += instructions()["descriptions"].get(name, [])
    return rng.choice(pool)


def _implicit_question(rng: random.Random, target: str, settings: QuestionSettings) -> str:
    description = _description(rng, target, settings)
    if settings.instructions and rng.random() < 0.5:
        return rng.choice(instructions()["implicit_questions"]).format(description=description.rstrip(".") + ".")
    return prompting.sample_question(rng, target, description)


def _explicit_question(rng: random.Random, target: str, settings: QuestionSettings) -> str:
    """A question naming the target, now and then by a synonym or lay name; the answer still uses its name."""
    names = [target]
    if settings.instructions:
        names += instructions()["synonyms"].get(target, [])
    # Drawn only with synonyms to choose from, so recipes without them draw the same questions as before.
    said = target if not settings.instructions or rng.random() < 0.7 else rng.choice(names)
    return rng.choice(prompting.EXPLICIT_QUESTIONS + (prompting.PER_TARGET_QUESTION,)).format(target=said)


def _single(rng: random.Random, target: str, settings: QuestionSettings, positive: bool) -> QuestionAnswer:
    if rng.random() < settings.implicit_ratio:
        question = _implicit_question(rng, target, settings)
        if rng.random() < settings.unnamed_answer_ratio:
            # Without a target name in the question, the predictor scores these unnamed forms.
            answer = prompting.positive_answer([]) if positive else prompting.negative_answer([])
            return QuestionAnswer(question, answer, [target] if positive else [], [target])
    else:
        question = _explicit_question(rng, target, settings)
    answer = prompting.positive_answer([target]) if positive else prompting.negative_answer([target])
    return QuestionAnswer(question, answer, [target] if positive else [], [target])


def segmentation_qa(rng: random.Random, positive: bool, present: list[str], absent: list[str],
                    settings: QuestionSettings) -> QuestionAnswer:
    """Stages 3-4: segment one or several present targets, or ask for an absent one (answered without [SEG])."""
    if not positive:
        return _single(rng, rng.choice(sorted(absent)), settings, positive=False)
    present = sorted(present)
    if len(present) >= 2 and rng.random() < settings.multi_target_ratio:
        targets = rng.sample(present, rng.randint(2, min(settings.max_targets, len(present))))
        question = rng.choice(MULTI_TARGET_QUESTIONS).format(targets=join_targets(targets))
        return QuestionAnswer(question, prompting.positive_answer(targets), targets, targets)
    return _single(rng, rng.choice(present), settings, positive=True)


def existence_qa(rng: random.Random, positive: bool, present: list[str], absent: list[str],
                 settings: QuestionSettings) -> QuestionAnswer:
    """Stage 2: is a structure in this crop? Text-only answers, so only the LM loss trains."""
    target = rng.choice(sorted(present if positive else absent))
    if rng.random() < settings.implicit_ratio:
        question = rng.choice(IMPLICIT_EXISTENCE_QUESTIONS).format(description=_description(rng, target, settings))
    else:
        question = rng.choice(prompting.EXISTENCE_QUESTIONS).format(target=target)
    answer = rng.choice(prompting.EXISTENCE_YES if positive else prompting.EXISTENCE_NO).format(target=target)
    return QuestionAnswer(question, answer, [], [target])
