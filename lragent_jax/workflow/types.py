"""The records of an episode and the two protocols around them: ``Workflow`` (who speaks next and
what env text comes before) and ``Policy`` (what an agent writes for a batch of turns).

Host-side only: pure Python, no jax.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from lragent_jax.stops import cut_at_stop

ENV = "env"
STOP_REASONS = ("eos", "stop", "length")


@dataclasses.dataclass(frozen=True)
class Segment:
    """A piece of trajectory text and who wrote it (``"env"`` or a role name)."""

    writer: str
    text: str

    def __post_init__(self):
        if not isinstance(self.writer, str) or not self.writer:
            raise ValueError(f"segment writer must be a non-empty string; got {self.writer!r}")
        if not isinstance(self.text, str):
            raise ValueError(f"segment text must be a string; got {type(self.text).__name__}")


@dataclasses.dataclass(frozen=True)
class TurnSpec:
    """What a workflow asks for next: ``append`` (env text, possibly "") then ``agent`` generates."""

    agent: str
    append: str = ""
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.agent, str) or not self.agent or self.agent == ENV:
            raise ValueError(f"turn agent must be a role name other than {ENV!r}; got {self.agent!r}")
        if not isinstance(self.append, str):
            raise ValueError(f"turn append must be a string; got {type(self.append).__name__}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int; got {self.max_new_tokens!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings; got {self.stop!r}")


@dataclasses.dataclass(frozen=True)
class TurnRequest:
    """One turn of one episode, as sent to ``Policy.turns``.

    ``append`` is the env text to add to episode ``episode``'s trajectory (as ONE segment) before
    ``agent`` generates at most ``max_new_tokens`` tokens, ending at EOS; the ``stop`` strings are a
    fallback end.
    """

    episode: int
    agent: str
    append: str
    max_new_tokens: int
    stop: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TurnOutput:
    """What the agent generated, without EOS and without the stop string that ended it.

    ``stop_reason``: "eos" (end-of-sequence token), "stop" (a stop string) or "length"
    (``max_new_tokens`` reached).
    """

    text: str
    stop_reason: str = "eos"

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise ValueError(f"turn output text must be a string; got {type(self.text).__name__}")
        if self.stop_reason not in STOP_REASONS:
            raise ValueError(f"stop_reason must be one of {STOP_REASONS}; got {self.stop_reason!r}")


@runtime_checkable
class Policy(Protocol):
    """Produces text for a batch of turns; the only required method is ``turns``.

    Contract, per episode id:
    - ``start_episode(episode, prompt_segments)`` (optional) is called once before the episode's first
      turn with the env segments that open the trajectory (instruction, question). A policy that
      generates from the trajectory must implement it: the prompt is not repeated in ``append``.
    - ``turns(requests)`` gets at most one request per episode, returns one ``TurnOutput`` per request,
      in order. Requests of one call may be for different agents.
    - The trajectory the driver records continues with ``clean_output(output.text, request.stop)`` as
      the agent's segment, then the next request's ``append``. A policy that keeps a cache must make it
      agree with that text (e.g. drop generated tokens past the cleaned text) before the next turn.
    - ``end_episode(episode)`` (optional) is called once after the episode's last turn: free its state.
    """

    def turns(self, requests: Sequence[TurnRequest]) -> list[TurnOutput]: ...


def clean_output(text: str, stop: Sequence[str] = ()) -> str:
    """The segment the driver records for a generated ``text``: cut at the first stop string, strip.

    Gold and inference text go through this same function, so whitespace is handled identically.
    """
    return cut_at_stop(text, stop).strip()


@dataclasses.dataclass(frozen=True)
class TurnLog:
    """One turn as it happened: ``output`` is the recorded (cleaned) text, ``raw_output`` the policy's."""

    agent: str
    append: str
    output: str
    raw_output: str
    stop_reason: str


@dataclasses.dataclass(frozen=True)
class EpisodeResult:
    """A workflow's verdict on a finished episode.

    ``trailing`` is env text written after the last turn (e.g. a closing bracket or the last
    observation before a step limit): it belongs to the record but no agent ever reads it.
    """

    answer: str | None
    finished: bool
    steps: int = 0
    malformed: int = 0
    trailing: str = ""


@dataclasses.dataclass(frozen=True)
class EpisodeRecord:
    """Everything about one episode: its segments (joined: the full text), outcome and turn log."""

    episode: int
    task: Any
    segments: tuple[Segment, ...]
    turns: tuple[TurnLog, ...]
    answer: str | None
    finished: bool
    steps: int
    malformed: int

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (the task as a dict when it is a dataclass, else as is)."""
        task = dataclasses.asdict(self.task) if dataclasses.is_dataclass(self.task) else self.task
        return {
            "episode": self.episode,
            "task": task,
            "answer": self.answer,
            "finished": self.finished,
            "steps": self.steps,
            "malformed": self.malformed,
            "segments": [{"writer": s.writer, "text": s.text} for s in self.segments],
            "turns": [dataclasses.asdict(t) for t in self.turns],
        }


class Workflow(abc.ABC):
    """Turn order and env text of one kind of episode. Holds configuration only; per-episode data
    lives in the ``state`` object returned by ``start`` and is owned by the workflow."""

    roles: tuple[str, ...] = ()

    @abc.abstractmethod
    def start(self, task: Any) -> Any:
        """A fresh state for one episode on ``task``."""

    def prompt(self, state: Any) -> tuple[Segment, ...]:
        """Env segments that open the trajectory (given to ``Policy.start_episode``)."""
        return ()

    @abc.abstractmethod
    def next_turn(self, state: Any) -> TurnSpec | None:
        """The next turn, or None when the episode is over. Called once per turn."""

    @abc.abstractmethod
    def on_output(self, state: Any, text: str) -> None:
        """Takes the (cleaned) text the agent of the last ``next_turn`` wrote."""

    @abc.abstractmethod
    def result(self, state: Any) -> EpisodeResult:
        """The outcome, once ``next_turn`` has returned None."""
