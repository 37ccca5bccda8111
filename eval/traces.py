"""Turn traces of plan / action / reflect episodes, for efficiency replay.

A trace is the opening prompt length plus a list of turns ``(agent, tokens appended before the turn,
tokens generated)``. ``generate_trace`` draws one at a given total length, deterministically by seed,
in the shape of a ReAct episode: plan writes a thought and an action type, action writes the argument,
the tool's observation is appended, ..., and reflect judges after Finish. ``trace_from_record`` turns a
real rollout (an ``EpisodeRecord``) into a trace, and traces round-trip through JSON files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class TraceTurn:
    agent: str
    append: int  # tokens appended (templates, observations) before the agent generates
    generate: int  # tokens the agent generates

    def __post_init__(self):
        if self.append < 0 or self.generate < 1:
            raise ValueError(f"trace turn needs append >= 0 and generate >= 1; got {self}")


@dataclasses.dataclass(frozen=True)
class Trace:
    name: str
    prompt: int
    turns: tuple[TraceTurn, ...]

    def __post_init__(self):
        if self.prompt < 1:
            raise ValueError(f"trace {self.name!r}: prompt must be >= 1 token; got {self.prompt}")
        object.__setattr__(self, "turns", tuple(self.turns))

    @property
    def total(self) -> int:
        return self.prompt + sum(t.append + t.generate for t in self.turns)

    @property
    def generated(self) -> int:
        return sum(t.generate for t in self.turns)

    def to_dict(self) -> dict:
        return {"name": self.name, "prompt": self.prompt,
                "turns": [dataclasses.asdict(t) for t in self.turns]}

    @classmethod
    def from_dict(cls, d: dict) -> "Trace":
        turns = d["turns"]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"'turns' must be a non-empty list; got {turns!r}")
        for t in turns:
            if not isinstance(t.get("agent"), str) or not t["agent"]:
                raise ValueError(f"a turn's 'agent' must be a non-empty string; got {t!r}")
        return cls(name=str(d["name"]), prompt=_count(d["prompt"], "prompt"),
                   turns=tuple(TraceTurn(t["agent"], _count(t["append"], "append"),
                                         _count(t["generate"], "generate")) for t in turns))


def _count(value, what: str) -> int:
    """A token count from JSON: an integer, never a float (3.7 tokens is a broken trace)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an integer number of tokens; got {value!r}")
    return int(value)


def generate_trace(total: int, seed: int = 0, *, plan: str = "plan", action: str = "action",
                   reflect: str = "reflect", generate_scale: float = 1.0) -> Trace:
    """A ReAct-shaped trace of exactly ``total`` tokens (>= 256), deterministic by (total, seed).

    A turn generates 2-48 tokens (13 on average at 16k); ``generate_scale`` multiplies every
    turn's generation (at least 1 token each) for workloads of longer answers, the prompt and
    observations taking what is left of ``total``."""
    if total < 256:
        raise ValueError(f"trace total length must be >= 256 tokens; got {total}")
    if isinstance(generate_scale, bool) or not isinstance(generate_scale, (int, float)) \
            or not generate_scale > 0:
        raise ValueError(f"generate_scale must be a number > 0; got {generate_scale!r}")
    rng = np.random.default_rng([seed, total])

    def scaled(n: int) -> int:
        return max(1, round(n * generate_scale))

    steps = int(rng.integers(2, 5))  # tool-using steps before Finish
    step_turns = [[(plan, 8, scaled(int(rng.integers(16, 48)))), (plan, 8, scaled(3)),
                   (action, 10, scaled(int(rng.integers(6, 16))))] for _ in range(steps)]
    closing = [(plan, 8, scaled(int(rng.integers(12, 32)))), (plan, 8, scaled(2)),
               (action, 10, scaled(2)), (reflect, 14, scaled(int(rng.integers(10, 24)))),
               (reflect, 8, scaled(4))]
    # short traces get fewer tool steps so that the prompt keeps at least 48 tokens
    while steps > 1 and sum(a + g for t in step_turns + [closing] for _, a, g in t) > total - 48:
        step_turns.pop()
        steps -= 1
    turns = [t for group in step_turns for t in group] + closing
    fixed = sum(a + g for _, a, g in turns)
    if fixed > total - 48:  # even one tool step does not fit
        raise ValueError(f"generate_scale {generate_scale:g} leaves no room for a 48-token prompt "
                         f"in a {total}-token trace: use a longer trace or a smaller scale")
    # the rest is the prompt (instruction + question) and the tool observations
    budget = total - fixed
    prompt = max(32, int(budget * rng.uniform(0.3, 0.5)))
    observations = budget - prompt
    if observations < steps:
        prompt, observations = max(1, budget - steps), min(steps, budget - 1)
    weights = rng.uniform(0.5, 1.5, steps)
    sizes = np.floor(observations * weights / weights.sum()).astype(int)
    sizes[-1] += observations - sizes.sum()
    # observation i is appended before the plan turn that follows action i
    out, step = [], 0
    for i, (agent, append, gen) in enumerate(turns):
        if agent == plan and i > 0 and turns[i - 1][0] == action and step < steps:
            append += int(sizes[step])
            step += 1
        out.append(TraceTurn(agent, append, gen))
    name = f"react-{total}-s{seed}" + (f"-g{generate_scale:g}" if generate_scale != 1 else "")
    trace = Trace(name=name, prompt=prompt, turns=tuple(out))
    assert trace.total == total, (trace.total, total)
    return trace


def trace_from_record(record, tokenizer) -> Trace:
    """The trace of a real episode (``workflow.EpisodeRecord``), counting tokens per segment."""
    segments = list(record.segments)
    first_role = next((i for i, s in enumerate(segments) if s.writer != "env"), len(segments))
    prompt = sum(len(tokenizer.encode(s.text)) for s in segments[:first_role])
    turns, pending = [], 0
    for s in segments[first_role:]:
        n = len(tokenizer.encode(s.text)) if s.text else 0
        if s.writer == "env":
            pending += n
        else:
            turns.append(TraceTurn(s.writer, pending, max(n, 1)))
            pending = 0
    return Trace(name=f"episode-{record.episode}", prompt=max(prompt, 1), turns=tuple(turns))


def save_traces(path: str | os.PathLike, traces: Sequence[Trace]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([t.to_dict() for t in traces], indent=1))
    return path


def load_traces(path: str | os.PathLike) -> list[Trace]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of traces")
    if not data:
        raise ValueError(f"{path}: holds no traces (an empty list); write some with "
                         "save_traces or use the traces.json of an accuracy run")
    traces = []
    for i, item in enumerate(data):
        try:
            traces.append(Trace.from_dict(item))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: trace {i} is malformed ({e!r})") from None
    return traces
