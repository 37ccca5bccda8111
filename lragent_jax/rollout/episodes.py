"""Episodes for the rollout engine: a workflow on a task, and the replay of a turn trace.

``WorkflowEpisode`` runs a ``Workflow`` exactly as ``run_episodes`` with a ``ModelPolicy`` does (the
same per-episode steps and the same turn preparation), one row at a time, so an episode gives the
same tokens whether it runs alone or among others. ``TraceEpisode`` replays a trace (opening prompt,
then per turn: append N random tokens, generate exactly M) for throughput measurements.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from lragent_jax.agents import finish_turn, prepare_turn
from lragent_jax.rollout.engine import (Continuation, ProgressBar, RolloutEngine, RolloutResult,
                                        Schedule)
from lragent_jax.session import CapacityError, GenerationSettings, Session, Turn, TurnResult
from lragent_jax.workflow import (RunningEpisode, TurnRequest, Workflow, finish_episode, next_spec,
                                  record_output, start_episode)


SeedRule = int | Callable[[int, Any], int] | None


def episode_seed(seed: SeedRule, index: int, task: Any) -> int | None:
    """The sampling seed of the episode at ``index`` of the stream: from ``(seed, index)`` for an
    int (the same whatever the row count), ``seed(index, task)`` for a callable (e.g. from the task,
    the same whatever the arrival order), None for None."""
    if seed is None:
        return None
    if callable(seed):
        return int(seed(index, task))
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


class WorkflowEpisode:
    """``workflow`` on ``task`` through the model of the session it runs in.

    ``temperature``, ``top_p``, ``top_k``: this episode's sampling; ``seed``: its sampling seed
    (used once ``GenerationSettings`` has a ``seed``; until then sampled tokens depend on the row and
    batch). A prompt longer than the row fails the episode; a later turn that finds the row full
    writes nothing (as ``ModelPolicy``) and sets ``out_of_capacity``.
    """

    def __init__(self, workflow: Workflow, task: Any, *, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None):
        if not isinstance(workflow, Workflow):
            raise ValueError(f"workflow must be a Workflow; got {type(workflow).__name__}")
        self.workflow, self.task = workflow, task
        self.sampling: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        if seed is not None:
            self.sampling["seed"] = seed
        GenerationSettings(**self.sampling)  # validate now, not at the first turn
        self.out_of_capacity = False
        self._running: RunningEpisode | None = None
        self._pending: tuple | None = None

    def begin(self, session: Session, row: int, index: int) -> None:
        self._session, self._row, self.index = session, row, index
        self._running = start_episode(self.workflow, self.task, index)
        pieces = [session.tokenizer.encode(s.text) if s.text else [] for s in self._running.segments]
        need = sum(map(len, pieces))
        if need > session.capacity:
            raise CapacityError(f"task {index}: its prompt is {need} tokens, more than the row "
                                f"capacity {session.capacity}; use a session with a larger "
                                "capacity or a shorter prompt")
        for ids in pieces:
            session.append_tokens(row, ids)

    def next_turn(self) -> Turn | None:
        running, session, row = self._running, self._session, self._row
        while True:
            spec = next_spec(self.workflow, running)
            if spec is None:
                return None
            request = TurnRequest(self.index, spec.agent, spec.append, spec.max_new_tokens,
                                  spec.stop)
            turn = prepare_turn(session, row, request, **self.sampling)
            if turn is not None:
                self._pending = (spec, request)
                return turn
            # the row is full: the agent says nothing (as ModelPolicy), no call is needed
            self.out_of_capacity = True
            record_output(self.workflow, running, spec, finish_turn(session, row, request, None))

    def on_result(self, result: TurnResult) -> None:
        spec, request = self._pending
        self._pending = None
        output = finish_turn(self._session, self._row, request, result)
        record_output(self.workflow, self._running, spec, output)

    def record(self):
        """The ``EpisodeRecord`` (after a failure: the segments up to it), None before ``begin``."""
        return None if self._running is None else finish_episode(self.workflow, self._running)


class TraceEpisode:
    """Replays ``trace`` (``.name``, ``.prompt`` tokens, ``.turns`` of ``.agent``, ``.append``,
    ``.generate``; e.g. ``eval.traces.Trace``): a random prompt, then per turn ``append`` random
    tokens and exactly ``generate`` greedy tokens. The token values come from ``seed``.

    ``first_token_call``: run each turn as a prefill call that generates one token (its time to
    first token) and a ``Continuation`` for the rest, as the efficiency benchmark times turns.
    ``block_tokens`` (0: no limit): the rest in continuations of at most this many tokens, as a
    server generates in blocks (rows whose turn ends early start their next turn in the next
    call instead of waiting for the call's longest generation); the tokens are the same.
    The model must have no EOS ids (``config.replace(eos_token_ids=())``) so that every turn
    generates exactly its count.
    """

    def __init__(self, trace, *, seed: int = 0, first_token_call: bool = True,
                 lowest_token: int = 3, block_tokens: int = 0):
        if not isinstance(block_tokens, int) or block_tokens < 0:
            raise ValueError(f"block_tokens must be an int >= 0 (0: no limit); got "
                             f"{block_tokens!r}")
        self.trace = self.task = trace
        self.seed, self.first_token_call, self.lowest_token = seed, first_token_call, lowest_token
        self.block_tokens = block_tokens
        self.generated: list[int] = []  # the generated token ids, in order
        self._turn = 0
        self._rest = 0  # tokens the current turn still has to generate in its continuation
        self._expect = 0

    def begin(self, session: Session, row: int, index: int) -> None:
        eos = tuple(session.config.eos_token_ids) + tuple(getattr(session.tokenizer,
                                                                  "eos_token_ids", ()))
        if eos:
            raise ValueError(f"trace replay needs a model without EOS ids (a turn must generate "
                             f"exactly its count); this one stops at {eos}: use "
                             "config.replace(eos_token_ids=()) and a tokenizer without EOS ids")
        total = self.trace.prompt + sum(t.append + t.generate for t in self.trace.turns)
        if total > session.capacity:
            raise CapacityError(f"trace {self.trace.name!r} (task {index}) needs {total} positions, "
                                f"more than the row capacity {session.capacity}")
        self._session, self._row = session, row
        self._rng = np.random.default_rng(self.seed)
        session.append_tokens(row, self._random(self.trace.prompt))

    def _random(self, n: int) -> tuple[int, ...]:
        vocab = self._session.config.vocab_size
        return tuple(self._rng.integers(self.lowest_token, vocab, n).tolist())

    def next_turn(self) -> Turn | Continuation | None:
        if self._rest:
            agent = self.trace.turns[self._turn - 1].agent
            take = min(self._rest, self.block_tokens) if self.block_tokens else self._rest
            self._expect, self._rest = take, self._rest - take
            return Continuation(Turn(agent, settings=GenerationSettings(
                max_new_tokens=self._expect)))
        if self._turn >= len(self.trace.turns):
            return None
        t = self.trace.turns[self._turn]
        self._turn += 1
        first = 1 if self.first_token_call else t.generate
        if self.block_tokens:
            first = min(first, self.block_tokens)
        self._expect, self._rest = first, t.generate - first
        return Turn(t.agent, append_ids=self._random(t.append),
                    settings=GenerationSettings(max_new_tokens=first))

    def on_result(self, result: TurnResult) -> None:
        if len(result.token_ids) != self._expect:
            raise RuntimeError(f"trace {self.trace.name!r}, turn {self._turn}: generated "
                               f"{len(result.token_ids)} tokens, expected {self._expect} "
                               f"(stop reason {result.stop_reason!r})")
        self.generated.extend(result.token_ids)

    def record(self) -> dict:
        """The trace's name, turns completed and generated token ids."""
        return {"trace": self.trace.name, "turns_done": self._turn - (1 if self._rest else 0),
                "generated_ids": list(self.generated)}


def run_workflow(workflow: Workflow, tasks: Iterable[Any], session: Session, *,
                 ordered: bool = True, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: SeedRule = 0, schedule: Schedule | None = None,
                 progress=None, engine: RolloutEngine | None = None) -> Iterator[RolloutResult]:
    """Run ``workflow`` on every task of the stream over the session's rows, continuously.

    Yields a ``RolloutResult`` per task (``.record`` is its ``EpisodeRecord``), in task order or, with
    ``ordered=False``, as episodes finish. ``seed``: see ``episode_seed`` (used with temperature > 0).
    ``progress``: a ``ProgressBar``, True for one on stderr, or any callable of ``RolloutProgress``.
    """
    total = len(tasks) if hasattr(tasks, "__len__") else None
    engine = engine or RolloutEngine(session, schedule=schedule,
                                     progress=_progress(progress, total))
    episodes = (WorkflowEpisode(workflow, task, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=episode_seed(seed, i, task) if temperature > 0 else None)
                for i, task in enumerate(tasks))
    yield from _closing(engine, engine.run(episodes, ordered=ordered, total=total))


def run_traces(traces: Iterable[Any], session: Session, *, seed: SeedRule = 0,
               first_token_call: bool = True, ordered: bool = True,
               schedule: Schedule | None = None, progress=None,
               engine: RolloutEngine | None = None,
               block_tokens: int = 0) -> Iterator[RolloutResult]:
    """Replay every trace of the stream over the session's rows (``TraceEpisode``), continuously;
    the random tokens of trace ``i`` come from ``episode_seed(seed, i, trace)``."""
    total = len(traces) if hasattr(traces, "__len__") else None
    engine = engine or RolloutEngine(session, schedule=schedule,
                                     progress=_progress(progress, total))
    episodes = (TraceEpisode(trace, seed=episode_seed(seed if seed is not None else 0, i, trace),
                             first_token_call=first_token_call, block_tokens=block_tokens)
                for i, trace in enumerate(traces))
    yield from _closing(engine, engine.run(episodes, ordered=ordered, total=total))


def _progress(progress, total):
    return ProgressBar(total) if progress is True else (progress or None)


def _closing(engine: RolloutEngine, results: Iterator[RolloutResult]) -> Iterator[RolloutResult]:
    try:
        yield from results
    finally:
        close = getattr(engine.progress, "close", None)
        if close is not None:
            close()
