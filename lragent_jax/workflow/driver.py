"""Running episodes: ``run_episodes`` steps all episodes in lockstep, one batched ``policy.turns``
call per step, through the per-episode steps below (``start_episode``, ``next_spec``,
``record_output``, ``finish_episode``), which the rollout engine reuses to run episodes one row at a
time.

Host-side only: pure Python, no jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from lragent_jax.workflow.types import (ENV, EpisodeRecord, Policy, Segment, TurnLog, TurnOutput,
                                        TurnRequest, TurnSpec, Workflow, clean_output)


@dataclasses.dataclass
class RunningEpisode:
    """An episode in progress: its workflow state, the segments written so far, its turn log."""

    episode: int
    task: Any
    state: Any
    segments: list[Segment]
    turns: list[TurnLog]


def run_episodes(workflow: Workflow, tasks: Sequence[Any], policy: Policy, *,
                 progress: Callable[[int, int], None] | None = None,
                 first_episode: int = 0) -> list[EpisodeRecord]:
    """Runs one episode per task, all in lockstep: each step makes ONE ``policy.turns`` call with one
    request for every episode still running (episodes may be at different agents).

    Episode ids are ``first_episode + index``. ``progress(done, total)`` is called after every step.
    Returns the records in task order. (``lragent_jax.rollout`` runs episodes continuously instead,
    over the rows of a session, with the same per-episode steps below.)
    """
    if not isinstance(workflow, Workflow):
        raise ValueError(f"workflow must be a Workflow; got {type(workflow).__name__}")
    if not callable(getattr(policy, "turns", None)):
        raise ValueError(f"policy must have a turns(requests) method; got {type(policy).__name__}")
    start_hook = getattr(policy, "start_episode", None)
    end_hook = getattr(policy, "end_episode", None)
    tasks = list(tasks)
    records: list[EpisodeRecord | None] = [None] * len(tasks)
    running: list[RunningEpisode] = []
    for index, task in enumerate(tasks):
        episode = start_episode(workflow, task, first_episode + index)
        running.append(episode)
        if start_hook is not None:
            start_hook(episode.episode, tuple(episode.segments))

    done = 0
    while running:
        batch: list[tuple[RunningEpisode, TurnSpec]] = []
        for episode in running:
            spec = next_spec(workflow, episode)
            if spec is None:
                records[episode.episode - first_episode] = finish_episode(workflow, episode)
                done += 1
                if end_hook is not None:
                    end_hook(episode.episode)
                continue
            batch.append((episode, spec))
        if batch:
            _step(workflow, policy, batch)
        running = [e for e in running if records[e.episode - first_episode] is None]
        if progress is not None:
            progress(done, len(tasks))
    return records  # type: ignore[return-value]


def start_episode(workflow: Workflow, task: Any, episode: int) -> RunningEpisode:
    """A running episode on ``task`` with its validated opening env segments."""
    state = workflow.start(task)
    prompt = tuple(workflow.prompt(state))
    for segment in prompt:
        if not isinstance(segment, Segment) or segment.writer != ENV:
            raise ValueError(f"workflow prompt must be env segments; got {segment!r}")
    return RunningEpisode(episode, task, state, list(prompt), [])


def next_spec(workflow: Workflow, episode: RunningEpisode) -> TurnSpec | None:
    """The episode's next turn (validated), or None when it is over."""
    spec = workflow.next_turn(episode.state)
    if spec is None:
        return None
    if not isinstance(spec, TurnSpec):
        raise ValueError(f"next_turn must return a TurnSpec or None; got {spec!r}")
    if spec.agent not in workflow.roles:
        raise ValueError(f"turn agent {spec.agent!r} is not one of the workflow's roles "
                         f"{workflow.roles}")
    return spec


def _step(workflow: Workflow, policy: Policy,
          batch: list[tuple[RunningEpisode, TurnSpec]]) -> None:
    requests = [TurnRequest(e.episode, s.agent, s.append, s.max_new_tokens, s.stop) for e, s in batch]
    outputs = list(policy.turns(requests))
    if len(outputs) != len(requests):
        raise ValueError(f"policy.turns returned {len(outputs)} outputs for {len(requests)} requests")
    for (episode, spec), output in zip(batch, outputs):
        record_output(workflow, episode, spec, output)


def record_output(workflow: Workflow, episode: RunningEpisode, spec: TurnSpec,
                   output: TurnOutput) -> None:
    """Append the turn's env text and cleaned output to the episode and hand it to the workflow."""
    if not isinstance(output, TurnOutput):
        raise ValueError(f"policy.turns must return TurnOutput objects; got {output!r} for "
                         f"episode {episode.episode}")
    text = clean_output(output.text, spec.stop)
    if spec.append:
        episode.segments.append(Segment(ENV, spec.append))
    episode.segments.append(Segment(spec.agent, text))
    episode.turns.append(TurnLog(spec.agent, spec.append, text, output.text, output.stop_reason))
    workflow.on_output(episode.state, text)


def finish_episode(workflow: Workflow, episode: RunningEpisode) -> EpisodeRecord:
    result = workflow.result(episode.state)
    segments = list(episode.segments)
    if result.trailing:
        segments.append(Segment(ENV, result.trailing))
    return EpisodeRecord(episode=episode.episode, task=episode.task, segments=tuple(segments),
                         turns=tuple(episode.turns), answer=result.answer, finished=result.finished,
                         steps=result.steps, malformed=result.malformed)
