"""The text side of the method: how a question and an answer become one token sequence, and the answer templates.

One sequence is `[BOS] <im_patch>*N " " question " " answer EOS` (the original R1Seg-3D format, no chat
template). Training (teacher forcing), the fast inference path (scoring the candidate answers) and
generation all build their sequences here, so the three cannot drift apart.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from .errors import InvalidInputError

IMAGE_TOKEN = "<im_patch>"
SEG_TOKEN = "[SEG]"
# Kept so that token ids line up with the original release (it added these two as well).
BOX_TOKENS = ("<bx_start>", "<bx_end>")
MAX_QUESTION_CHARS = 1000

# A small set of answer templates: the fast path scores exactly these, so a model trained on them can
# answer by teacher forcing instead of sampling.
POSITIVE_ANSWER = "It is [SEG]."
NAMED_POSITIVE_ANSWER = "The {target} is [SEG]."
NEGATIVE_ANSWER = "Sorry, there is no {target}."
MULTI_TARGET_JOIN = " and "
# A multi-target question is answered one target at a time, each with this explicit question.
PER_TARGET_QUESTION = "Please segment the {target}."

EXPLICIT_QUESTIONS = (
    "Can you segment the {target} in this image?",
    "Please segment the {target} in this image.",
    "Segment the {target}.",
    "Where is the {target}? Please answer and segment.",
    "Could you outline the {target} in this CT?",
    "Show me the {target}.",
    "What is the segmentation of the {target}?",
    "Please delineate the {target} in this scan.",
)
IMPLICIT_QUESTIONS = (
    "{description} Please answer and segment.",
    "Description: {description} Please answer and segment based on the above description.",
    "{description} Which structure is this? Please segment it.",
    "Find the structure described here: {description}",
    "{description} Can you locate and segment it in this CT?",
)
# Phrasings that training never uses: the evaluation asks with these, so a score measures unseen wording.
HELD_OUT_EXPLICIT_QUESTIONS = (
    "Highlight the {target} on this CT.",
    "I need a segmentation of the {target}.",
)
HELD_OUT_IMPLICIT_QUESTIONS = (
    "{description} Mark this structure on the scan.",
    "Which structure matches this description? {description}",
)
EXISTENCE_QUESTIONS = (
    "Does this CT contain the {target}?",
    "Is the {target} visible in this scan?",
    "Can you see the {target} in this image?",
)
EXISTENCE_YES = ("Yes, the {target} is visible in this CT.", "The {target} is clearly visible in the provided CT.")
EXISTENCE_NO = ("Sorry, there is no {target}.", "No, the {target} is not in this scan.")


def validate_question(question: str) -> str:
    """Strip and check a user's question; the message names the problem."""
    if not isinstance(question, str):
        raise InvalidInputError(f"the question must be text, got {type(question).__name__}")
    text = " ".join(question.split())
    if not text:
        raise InvalidInputError("the question is empty: type what you want segmented, e.g. 'segment the liver'")
    if len(text) > MAX_QUESTION_CHARS:
        raise InvalidInputError(
            f"the question is {len(text)} characters long; the limit is {MAX_QUESTION_CHARS}")
    if IMAGE_TOKEN in text or SEG_TOKEN in text:
        raise InvalidInputError(f"the question may not contain the model's own tokens {IMAGE_TOKEN} or {SEG_TOKEN}")
    return as_sentence(text)


def as_sentence(text: str) -> str:
    """"segment the liver" -> "Segment the liver.": every question training writes is a sentence, and a small LLM
    reads a bare lower-case command as something else (the default model then answers "is [SEG]." and finds
    nothing). Only the first letter and a missing final mark change; the words stay the user's."""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".?!" else text + "."


def positive_answer(targets: list[str]) -> str:
    """The answer with one [SEG] per target, naming each target so the masks can be told apart."""
    if not targets:
        return POSITIVE_ANSWER
    if len(targets) == 1:
        return NAMED_POSITIVE_ANSWER.format(target=targets[0])
    parts = [NAMED_POSITIVE_ANSWER.format(target=t).rstrip(".") for t in targets]
    # Only the sentence's first "The" is capitalised.
    return MULTI_TARGET_JOIN.join([parts[0]] + [part[0].lower() + part[1:] for part in parts[1:]]) + "."


def negative_answer(targets: list[str]) -> str:
    names = MULTI_TARGET_JOIN.join(targets) if targets else "such target"
    return NEGATIVE_ANSWER.format(target=names)


_NAMED_SEG = re.compile(r"(?:the\s+)?([A-Za-z][\w\s\-]*?)\s+is\s+\[SEG\]", re.IGNORECASE)


_NAMED_ABSENT = re.compile(r"there is no\s+([^.;!?]+)", re.IGNORECASE)
_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)


def targets_named_absent(answer: str) -> list[str]:
    """The names an answer says are not there ("Sorry, there is no liver and spleen." -> liver, spleen)."""
    names = []
    for match in _NAMED_ABSENT.finditer(answer):
        for part in re.split(r",\s*|\s+and\s+", match.group(1)):
            part = _ARTICLE.sub("", part.strip()).lower()
            if part:
                names.append(part)
    return names


def targets_named_in_answer(answer: str) -> list[str | None]:
    """For each [SEG] in an answer, the target name written before it ("The liver is [SEG]"), or None."""
    names: list[str | None] = []
    position = 0
    for match in re.finditer(re.escape(SEG_TOKEN), answer):
        clause = answer[position:match.end()]
        named = _NAMED_SEG.search(clause.split(",")[-1].split(" and ")[-1])
        names.append(named.group(1).strip().lower() if named else None)
        position = match.end()
    return names


@dataclass(frozen=True)
class TokenIds:
    """The ids the model needs; read from the tokenizer once and kept in the checkpoint config."""
    image: int
    seg: int
    eos: int
    pad: int
    bos: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenIds":
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IMAGE_TOKEN, SEG_TOKEN) if t not in vocab]
        if missing:
            raise InvalidInputError(
                f"the tokenizer lacks the special tokens {missing}; build the model with "
                "LanguageModel.add_special_tokens or use the tokenizer saved with the checkpoint")
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return cls(image=vocab[IMAGE_TOKEN], seg=vocab[SEG_TOKEN], eos=eos, pad=pad, bos=tokenizer.bos_token_id)


def prompt_ids(tokenizer, question: str, num_image_tokens: int, history: str = "") -> list[int]:
    """Token ids of `[BOS] <im_patch>*N " " [history] question`; the tokenizer decides whether a BOS comes first."""
    text = IMAGE_TOKEN * num_image_tokens + " " + (history + " " if history else "") + question
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def answer_ids(tokenizer, answer: str, eos_id: int) -> list[int]:
    """Token ids of `" " answer EOS`, tokenised on their own so every candidate shares the prompt's ids."""
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [eos_id]


@dataclass
class TeacherForcedBatch:
    input_ids: torch.Tensor       # (B, L) right-padded
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor          # (B, L), -100 outside the answer


def build_teacher_forced_batch(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> TeacherForcedBatch:
    """Concatenate prompt and answer ids per row; only answer tokens carry labels (causal LM loss)."""
    rows = [p + a for p, a in zip(prompts, answers)]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        n = len(prompt) + len(answer)
        input_ids[i, :n] = torch.tensor(prompt + answer)
        attention_mask[i, :n] = 1
        labels[i, len(prompt):n] = torch.tensor(answer)
    return TeacherForcedBatch(input_ids, attention_mask, labels)


def sample_question(rng: random.Random, target: str, description: str | None = None) -> str:
    """One explicit (name) or implicit (description) question for training data."""
    if description:
        return rng.choice(IMPLICIT_QUESTIONS).format(description=description.rstrip(".") + ".")
    return rng.choice(EXPLICIT_QUESTIONS).format(target=target)
