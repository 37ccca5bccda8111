"""A policy whose text comes from a function: gold trajectories through the same driver as the
model, and tests.

Host-side only: pure Python, no jax.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from lragent_jax.workflow.types import ENV, Segment, TurnOutput, TurnRequest, clean_output

Responder = Callable[[TurnRequest, tuple[Segment, ...]], str]


class ScriptedPolicy:
    """A policy whose text comes from ``respond(request, trajectory)``: ``trajectory`` holds the
    episode's segments so far, ending with the request's ``append``. Used to produce gold
    trajectories through the same driver as the model, and in tests.

    ``batches`` logs every ``turns`` call as a list of (episode, agent).
    """

    def __init__(self, respond: Responder):
        if not callable(respond):
            raise ValueError("respond must be callable")
        self._respond = respond
        self._trajectories: dict[int, list[Segment]] = {}
        self.batches: list[list[tuple[int, str]]] = []

    @classmethod
    def from_outputs(cls, outputs: Mapping[int, Sequence[str | tuple[str, str]]]) -> ScriptedPolicy:
        """Replays ``outputs[episode]`` in order; an item ``(agent, text)`` also checks the agent."""
        cursors = {episode: 0 for episode in outputs}

        def respond(request: TurnRequest, _: tuple[Segment, ...]) -> str:
            script = outputs.get(request.episode)
            if script is None or cursors[request.episode] >= len(script):
                raise ValueError(f"no scripted output left for episode {request.episode} "
                                 f"(agent {request.agent!r})")
            item = script[cursors[request.episode]]
            cursors[request.episode] += 1
            if isinstance(item, tuple):
                agent, item = item
                if agent != request.agent:
                    raise ValueError(f"episode {request.episode}, turn {cursors[request.episode] - 1}"
                                     f": script is for {agent!r} but the workflow asked "
                                     f"{request.agent!r}")
            return item

        return cls(respond)

    def start_episode(self, episode: int, prompt_segments: Sequence[Segment]) -> None:
        self._trajectories[episode] = list(prompt_segments)

    def end_episode(self, episode: int) -> None:
        self._trajectories.pop(episode, None)

    def turns(self, requests: Sequence[TurnRequest]) -> list[TurnOutput]:
        self.batches.append([(r.episode, r.agent) for r in requests])
        outputs = []
        for request in requests:
            trajectory = self._trajectories.setdefault(request.episode, [])
            if request.append:
                trajectory.append(Segment(ENV, request.append))
            text = self._respond(request, tuple(trajectory))
            if not isinstance(text, str):
                raise ValueError(f"scripted response for episode {request.episode} must be a "
                                 f"string; got {type(text).__name__}")
            trajectory.append(Segment(request.agent, clean_output(text, request.stop)))
            stopped = any(s in text for s in request.stop)
            outputs.append(TurnOutput(text, "stop" if stopped else "eos"))
        return outputs
