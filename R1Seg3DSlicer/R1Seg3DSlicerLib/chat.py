"""The chat panel's state as plain Python: what was asked, what came back, what the buttons say.

The widget only forwards user actions and worker events here and then redraws from this object,
so every rule about the conversation (one question at a time, Cancel while running, errors shown
as a message in the conversation, links per found target) is testable without Qt or Slicer. Every text
the panel shows goes through Slicer's translation function (i18n.py).
"""

from __future__ import annotations

import enum
import html
import time
from dataclasses import dataclass, field

from .i18n import tr as _

LINK_SCHEME = "r1seg"


class ChatState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    CANCELLING = "cancelling"


class TurnStatus(enum.Enum):
    PENDING = "pending"
    ANSWERED = "answered"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ChatError(RuntimeError):
    """An action that the panel's current state does not allow (the widget disables it anyway)."""


@dataclass
class FoundTarget:
    name: str
    volume_ml: float
    voxel_count: int
    segmentation_node_id: str | None = None
    segment_id: str | None = None
    visible: bool = True

    @property
    def in_scene(self) -> bool:
        return self.segment_id is not None


@dataclass
class Turn:
    question: str
    volume_name: str
    status: TurnStatus = TurnStatus.PENDING
    answer: str = ""
    present: bool | None = None
    targets: list[FoundTarget] = field(default_factory=list)
    error: str = ""
    notes: list[str] = field(default_factory=list)
    device: str = ""
    elapsed_s: float | None = None
    # Whatever the scene code needs to take this answer back (a scene.SceneChange); opaque here.
    undo_token: object = None
    undone: bool = False

    @property
    def can_undo(self) -> bool:
        return self.undo_token is not None and not self.undone


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    stage: str

    @property
    def fraction(self) -> float | None:
        if self.total <= 0:
            return None
        return min(max(self.done / self.total, 0.0), 1.0)


@dataclass(frozen=True)
class Link:
    """A parsed transcript link: `action` is "toggle", "center" or "undo"."""

    action: str
    turn_index: int
    target_index: int | None = None


class PromptHistory:
    """The questions sent, for Up/Down in the question box, as in a shell: Up steps back through them, Down forward,
    and Down past the newest gives back the text that was being typed before Up. Each call returns the text the box
    should show, or None to leave it as it is."""

    MAX_ENTRIES = 100

    def __init__(self):
        self._entries: list[str] = []
        self._position: int | None = None   # index being shown; None: the user's own text
        self._draft = ""

    def add(self, question: str) -> None:
        if not self._entries or self._entries[-1] != question:   # a repeated question is kept once
            self._entries.append(question)
            del self._entries[:-self.MAX_ENTRIES]
        self._position, self._draft = None, ""

    def previous(self, current_text: str) -> str | None:
        if not self._entries or self._position == 0:
            return None
        if self._position is None:
            self._draft = current_text
            self._position = len(self._entries)
        self._position -= 1
        return self._entries[self._position]

    def next(self, current_text: str) -> str | None:
        if self._position is None:
            return None
        self._position += 1
        if self._position == len(self._entries):
            self._position = None
            return self._draft
        return self._entries[self._position]


class ChatSession:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self.history = PromptHistory()   # outlives Clear: it is the user's typing, not the conversation
        self._turns: list[Turn] = []
        self._state = ChatState.IDLE
        self._progress: Progress | None = None
        self._started_at: float | None = None

    # ---- state ---------------------------------------------------------------------------

    @property
    def state(self) -> ChatState:
        return self._state

    @property
    def turns(self) -> tuple[Turn, ...]:
        return tuple(self._turns)

    @property
    def progress(self) -> Progress | None:
        return self._progress

    @property
    def pending_turn(self) -> Turn | None:
        if self._state is ChatState.IDLE:
            return None
        return self._turns[-1]

    # ---- user actions --------------------------------------------------------------------

    def send(self, question: str, volume_name: str) -> Turn:
        question = question.strip()
        if self._state is not ChatState.IDLE:
            raise ChatError(_("A question is already running; wait for it or cancel it."))
        if not question:
            raise ChatError(_("Type a question first."))
        turn = Turn(question=question, volume_name=volume_name)
        self._turns.append(turn)
        self.history.add(question)
        self._state = ChatState.RUNNING
        self._progress = None
        self._started_at = self._clock()
        return turn

    def request_cancel(self) -> bool:
        """True when this call moved a running question to cancelling."""
        if self._state is not ChatState.RUNNING:
            return False
        self._state = ChatState.CANCELLING
        return True

    def clear(self) -> None:
        if self._state is not ChatState.IDLE:
            raise ChatError(_("Cannot clear the conversation while a question is running."))
        self._turns.clear()
        self._progress = None

    def mark_undone(self, turn_index: int) -> Turn:
        turn = self._turns[turn_index]
        if not turn.can_undo:
            raise ChatError(_("This answer has nothing left to undo."))
        turn.undone = True
        for target in turn.targets:
            target.segment_id = None
        return turn

    def forget_segmentation(self, segmentation_node_id: str) -> None:
        """The user deleted a segmentation: its targets lose their links and their answers the undo."""
        for turn in self._turns:
            touched = [t for t in turn.targets if t.segmentation_node_id == segmentation_node_id]
            for target in touched:
                target.segment_id = None
            if touched:
                turn.undo_token = None

    def set_visibility(self, turn_index: int, target_index: int, visible: bool) -> FoundTarget:
        target = self._turns[turn_index].targets[target_index]
        target.visible = visible
        return target

    # ---- worker events -------------------------------------------------------------------

    def report_progress(self, done: int, total: int, stage: str) -> None:
        if self._state is ChatState.IDLE:
            return  # a late event from a question that already ended
        self._progress = Progress(int(done), int(total), str(stage))

    def complete(self, answer: str, present: bool, targets, notes=(), device: str = "", undo_token=None) -> Turn:
        turn = self._end(TurnStatus.ANSWERED)
        turn.answer = answer
        turn.present = bool(present)
        turn.targets = list(targets)
        turn.notes = list(notes)
        turn.device = device
        turn.undo_token = undo_token
        return turn

    def fail(self, message: str, notes=()) -> Turn:
        turn = self._end(TurnStatus.FAILED)
        turn.error = message.strip() or _("The question failed for an unknown reason.")
        turn.notes = list(notes)
        return turn

    def mark_cancelled(self) -> Turn:
        return self._end(TurnStatus.CANCELLED)

    def _end(self, status: TurnStatus) -> Turn:
        if self._state is ChatState.IDLE:
            raise ChatError(_("No question is running."))
        turn = self._turns[-1]
        turn.status = status
        turn.elapsed_s = self._clock() - self._started_at
        self._state = ChatState.IDLE
        self._progress = None
        self._started_at = None
        return turn

    # ---- what the panel shows ------------------------------------------------------------

    @property
    def elapsed_s(self) -> float | None:
        """Seconds since the running question was sent (None when none runs)."""
        return None if self._started_at is None else self._clock() - self._started_at

    @property
    def send_button_text(self) -> str:
        return {ChatState.IDLE: _("Send"), ChatState.RUNNING: _("Cancel"),
                ChatState.CANCELLING: _("Cancelling…")}[self._state]

    @property
    def send_button_enabled(self) -> bool:
        return self._state is not ChatState.CANCELLING

    @property
    def question_editable(self) -> bool:
        return self._state is ChatState.IDLE

    @property
    def status_text(self) -> str:
        if self._state is ChatState.CANCELLING:
            return _("Cancelling…")
        if self._state is ChatState.RUNNING:
            elapsed = self.elapsed_s
            if self._progress is None:
                return _("Starting… ({seconds:.0f} s)").format(seconds=elapsed)
            stage = self._progress.stage[:1].upper() + self._progress.stage[1:]
            if self._progress.total > 0:
                return _("{stage}: {done}/{total} ({seconds:.0f} s)").format(
                    stage=stage, done=self._progress.done, total=self._progress.total, seconds=elapsed)
            return _("{stage} ({seconds:.0f} s)").format(stage=stage, seconds=elapsed)
        if not self._turns:
            return _("Ask a question about the selected CT.")
        last = self._turns[-1]
        if last.status is TurnStatus.ANSWERED and last.device:
            return _("Answered in {seconds:.1f} s on {device}").format(seconds=last.elapsed_s, device=last.device)
        return {
            TurnStatus.ANSWERED: _("Answered in {seconds:.1f} s").format(seconds=last.elapsed_s),
            TurnStatus.FAILED: _("The last question failed; see the conversation."),
            TurnStatus.CANCELLED: _("Cancelled."),
            TurnStatus.PENDING: "",
        }[last.status]

    def transcript_html(self) -> str:
        return "".join(_turn_html(index, turn) for index, turn in enumerate(self._turns))


def link_url(action: str, turn_index: int, target_index: int | None = None) -> str:
    if target_index is None:
        return f"{LINK_SCHEME}:{action}/{turn_index}"
    return f"{LINK_SCHEME}:{action}/{turn_index}/{target_index}"


def parse_link(url: str) -> Link | None:
    """The Link behind a transcript anchor, or None for anything that is not one of ours."""
    prefix = LINK_SCHEME + ":"
    if not url.startswith(prefix):
        return None
    parts = url[len(prefix):].split("/")
    if parts[0] not in ("toggle", "center", "undo"):
        return None
    try:
        numbers = [int(part) for part in parts[1:]]
    except ValueError:
        return None
    expected_numbers = 1 if parts[0] == "undo" else 2
    if len(numbers) != expected_numbers:
        return None
    return Link(parts[0], numbers[0], numbers[1] if len(numbers) == 2 else None)


def _turn_html(turn_index: int, turn: Turn) -> str:
    escape = html.escape
    parts = [
        f'<p><b>{escape(_("You"))}</b> <span style="color:gray">({escape(turn.volume_name)})</span>:'
        f' {escape(turn.question)}</p>'
    ]
    if turn.status is TurnStatus.PENDING:
        parts.append(f'<p style="color:gray"><i>{escape(_("Thinking…"))}</i></p>')
    elif turn.status is TurnStatus.CANCELLED:
        parts.append(f'<p style="color:gray"><i>{escape(_("Cancelled; nothing was added to the scene."))}</i></p>')
    elif turn.status is TurnStatus.FAILED:
        parts.append(f'<p style="color:#b00020"><b>{escape(_("Error:"))}</b> {escape(turn.error)}</p>')
    else:
        parts.append(f"<p><b>R1Seg3D</b>: {escape(turn.answer)}</p>")
        if turn.present is False:
            # The answer above says why (absent from this scan, or a structure the model was not trained on).
            parts.append(f'<p style="color:gray"><i>{escape(_("No segment was added."))}</i></p>')
        if turn.targets:
            parts.append("<ul>")
            for target_index, target in enumerate(turn.targets):
                parts.append(f"<li>{_target_html(turn_index, target_index, target)}</li>")
            parts.append("</ul>")
        if turn.can_undo:
            parts.append(f'<p><a href="{link_url("undo", turn_index)}">{escape(_("Undo this answer"))}</a></p>')
        elif turn.undone:
            parts.append(f'<p style="color:gray"><i>{escape(_("Undone: its segments were removed."))}</i></p>')
    for note in turn.notes:
        parts.append(f'<p style="color:#8a6d00">{escape(_("Note: {note}").format(note=note))}</p>')
    return "".join(parts) + "<hr/>"


def _target_html(turn_index: int, target_index: int, target: FoundTarget) -> str:
    escape = html.escape
    label = f"<b>{escape(target.name)}</b> — {escape(_('{volume:.1f} mL').format(volume=target.volume_ml))}"
    if not target.in_scene:
        if target.voxel_count == 0:
            return label + f' <span style="color:gray">({escape(_("empty mask, not added"))})</span>'
        return label + f' <span style="color:gray">({escape(_("removed"))})</span>'
    toggle = _("hide") if target.visible else _("show")
    return (
        f'{label} · <a href="{link_url("toggle", turn_index, target_index)}">{escape(toggle)}</a>'
        f' · <a href="{link_url("center", turn_index, target_index)}">{escape(_("centre"))}</a>'
    )
