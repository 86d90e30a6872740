"""Multi-turn state: earlier questions and answers, and the targets a follow-up question may refer to."""
from __future__ import annotations

from dataclasses import dataclass, field

# Older turns are dropped from the prompt first: the LLM's context also has to hold the visual tokens.
MAX_HISTORY_TURNS = 4


@dataclass
class Turn:
    question: str
    answer: str
    targets: list[str]


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)

    def add(self, question: str, answer: str, targets: list[str]) -> None:
        self.turns.append(Turn(question, answer, list(targets)))

    def clear(self) -> None:
        self.turns.clear()

    def history_text(self) -> str:
        """Earlier turns as plain text, placed between the image tokens and the new question."""
        recent = self.turns[-MAX_HISTORY_TURNS:]
        return " ".join(f"{turn.question} {turn.answer}" for turn in recent)

    def last_targets(self) -> list[str]:
        """The targets of the latest turn that had any, for follow-ups such as "how large is it?"."""
        for turn in reversed(self.turns):
            if turn.targets:
                return list(turn.targets)
        return []
