"""A minimal other turn order: every role speaks once per round, in a fixed order.

Host-side only: pure Python, no jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from lragent_jax.workflow.types import ENV, EpisodeResult, Segment, TurnSpec, Workflow


@dataclasses.dataclass
class RoundRobinState:
    task: str
    turn: int = 0
    last_output: str | None = None


class RoundRobinWorkflow(Workflow):
    """``rounds`` rounds in which every role speaks once, in the order given. Before each turn the env
    appends ``templates[role]`` (formatted with ``round``, 1-based, and ``role``); the prompt is
    ``prompt.format(task=task)``. The answer is the last turn's text."""

    def __init__(self, roles: Sequence[str], rounds: int, templates: Mapping[str, str] | None = None,
                 *, prompt: str = "{task}\n", max_new_tokens: int = 64, stop: tuple[str, ...] = ()):
        roles = tuple(roles)
        if not roles or any(not isinstance(r, str) or not r or r == ENV for r in roles):
            raise ValueError(f"roles must be non-empty names other than {ENV!r}; got {roles!r}")
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1; got {rounds}")
        templates = dict(templates) if templates is not None else {r: f"{r}: " for r in roles}
        missing = [r for r in roles if r not in templates]
        if missing:
            raise ValueError(f"templates has no entry for roles {missing}")
        self.roles = tuple(dict.fromkeys(roles))
        self.order, self.rounds, self.templates = roles, rounds, templates
        self.prompt_template, self.max_new_tokens, self.stop = prompt, max_new_tokens, stop

    def start(self, task: Any) -> RoundRobinState:
        return RoundRobinState(task=str(task))

    def prompt(self, state: RoundRobinState) -> tuple[Segment, ...]:
        return (Segment(ENV, self.prompt_template.format(task=state.task)),)

    def next_turn(self, state: RoundRobinState) -> TurnSpec | None:
        if state.turn >= self.rounds * len(self.order):
            return None
        role = self.order[state.turn % len(self.order)]
        append = self.templates[role].format(round=state.turn // len(self.order) + 1, role=role)
        return TurnSpec(role, append, self.max_new_tokens, self.stop)

    def on_output(self, state: RoundRobinState, text: str) -> None:
        state.turn += 1
        state.last_output = text

    def result(self, state: RoundRobinState) -> EpisodeResult:
        return EpisodeResult(answer=state.last_output, finished=True, steps=state.turn)
