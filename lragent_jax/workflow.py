"""Multi-agent episodes over one shared, append-only trajectory, independent of how text is generated.

An episode's trajectory is a sequence of SEGMENTS, each written by one writer: ``"env"`` (instruction,
question, templates, tool observations) or a role name (``"plan"``, ``"action"``, ...). Token-level code
tokenizes every segment on its own and concatenates the pieces, so a role boundary never merges BPE
tokens; training uses the same segmentation. The text only ever grows.

Pieces:
- ``Workflow``: decides who speaks next and what env text comes before (``ReActWorkflow`` for the
  paper's plan / action / reflect loop, ``RoundRobinWorkflow`` as a minimal other order).
- ``Policy``: produces text for a batch of turns (``ScriptedPolicy`` here; the model-backed policy that
  keeps the KV cache lives elsewhere and implements the same protocol).
- ``run_episodes``: steps all episodes in lockstep, one batched ``policy.turns`` call per step.

Gold trajectories are produced by running a ``ScriptedPolicy`` through ``run_episodes``, so a training
prompt is byte-identical to the prompt the model sees at inference.

Host-side only: pure Python, no jax.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from lragent_jax.stops import cut_at_stop

ENV = "env"
STOP_REASONS = ("eos", "stop", "length")


# --------------------------------------------------------------------------------------------------
# Data types


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


# --------------------------------------------------------------------------------------------------
# Workflows


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


@dataclasses.dataclass(frozen=True)
class ReActTemplates:
    """The env text of the ReAct protocol. ``default()``: spelled correctly; ``scienceqa()``: the
    markers of the published ScienceQA trajectories (typos "Aciton", "Obversation" kept).

    ``instruction`` may contain ``{actions}`` (the numbered action lines, built from the tools'
    descriptions and ``finish_description`` / ``reflect_description``) and ``{count}`` (how many);
    without ``{actions}`` it is used verbatim, e.g. an instruction taken from published data.
    """

    instruction: str
    finish_description: str
    reflect_description: str
    action_line: str = "({index}) {description}"
    question: str = "\nQuestion: {question}\n"
    thought: str = "Thought: \n### Response:\n"
    action: str = "\nAction: \n### Response:\n"
    argument: str = "\nAction: {action}[\n### Response:\n"
    argument_close: str = "]"
    observation: str = "\nObservation: {observation}\n"
    reflect_request: str = "Please reflect your answer."
    retry: str = "The answer may be wrong, please try to solve the question again."
    invalid_unknown: str = "Invalid action. The action must be one of: {actions}."
    invalid_reflect_first: str = "Invalid action. Reflect only follows the Finish action."
    invalid_need_reflect: str = ("Invalid action. After Finish the action must be Reflect[right] or "
                                 "Reflect[wrong].")
    invalid_reflect_argument: str = "Invalid action. Reflect takes right or wrong."
    invalid_empty: str = "Invalid action. {action} needs an argument."
    finish: str = "Finish"
    reflect: str = "Reflect"
    right: str = "right"
    wrong: str = "wrong"

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if not isinstance(getattr(self, field.name), str):
                raise ValueError(f"ReActTemplates.{field.name} must be a string")
        for name, key in (("question", "{question}"), ("argument", "{action}"),
                          ("observation", "{observation}")):
            if key not in getattr(self, name):
                raise ValueError(f"ReActTemplates.{name} must contain {key}; got "
                                 f"{getattr(self, name)!r}")

    @classmethod
    def default(cls) -> ReActTemplates:
        return cls(
            instruction=("Answer the question with interleaving Thought, Action, Observation steps. "
                         "Thought reasons about the current situation. Action can be {count} types:\n"
                         "{actions}"),
            finish_description="Finish[answer], which returns the short answer and finishes the task.",
            reflect_description=("Reflect[right/wrong], which judges the answer after Finish. Reflect "
                                 "must be the next Action after Finish."),
        )

    @classmethod
    def scienceqa(cls, instruction: str | None = None) -> ReActTemplates:
        """Markers of the published ScienceQA data. For prompts identical to that data use
        ``lragent_jax.tasks.scienceqa.scienceqa_templates()`` (the published instruction)."""
        return cls(
            instruction=instruction if instruction is not None else (
                "Answer the multiple-choice science question with interleaving Thought, Action, "
                "Observation steps. Thought can reason about the current situation, and Action can be "
                "{count} types:\n{actions}"),
            finish_description="Finish[option], which returns the answer option and finishes the task.",
            reflect_description=("Reflect[right/wrong], which reflects the answer right or wrong based "
                                 "on the context history. Reflect must be the next Action after Finish."),
            question="\nQuestion:{question}\n",
            argument="\nAciton: {action}[\n### Response:\n",
            observation="\nObversation: {observation}\n",
            retry="The answer maybe wrong, please try to solve the question again.",
        )


Tool = tuple[Callable[[str], str], str]  # (function, description shown in the instruction)

_ACTION_RE = re.compile(r"([A-Za-z][\w-]*)\s*(?:\[(.*)\])?", re.DOTALL)


@dataclasses.dataclass
class ReActState:
    """Per-episode state of ``ReActWorkflow`` (mutable, owned by the workflow)."""

    question: str
    writer: str                     # role writing the current Thought/Action cycle
    phase: str = "thought"          # "thought" | "action" | "argument" | "done"
    pending: str = ""               # env text waiting to be appended before the next thought
    action_type: str = ""
    awaiting_reflection: bool = False
    last_finish: str | None = None
    answer: str | None = None
    finished: bool = False
    steps: int = 0
    malformed: int = 0
    trailing: str = ""


class ReActWorkflow(Workflow):
    """The paper's ReAct loop: ``plan`` writes a Thought and an action type, ``action`` writes the
    argument, the tool's answer is appended as an Observation. After ``Finish[answer]`` the
    ``reflect`` role writes a Thought and ``Reflect[right]`` (episode over, answer = the Finish
    argument) or ``Reflect[wrong]`` (plan tries again). Text per cycle::

        Thought: \\n### Response:\\n{thought}
        \\nAction: \\n### Response:\\n{type}
        \\nAction: {type}[\\n### Response:\\n{argument}
        ]\\nObservation: {tool output}\\n

    An action turn may also give the whole action inline, ``Type[argument]`` (the reflect role
    writes ``Reflect[right]`` this way); then no argument turn follows. Unknown types, Reflect
    before Finish, a non-Reflect action after Finish and empty arguments get an "Invalid action"
    observation and count as malformed. After ``max_steps`` cycles an unfinished episode ends.

    ``reflect=None`` gives a two-role loop in which Finish ends the episode; ``action=plan`` lets one
    role write everything. Tasks are question strings or objects with a ``question`` attribute.
    ``tool_errors``: "observe" (a tool that raises answers "Error: ..." and the agent goes on) or
    "raise" (the exception propagates: the rollout engine ends that episode as failed).
    """

    def __init__(self, tools: Mapping[str, Tool], *, templates: ReActTemplates | None = None,
                 plan: str = "plan", action: str = "action", reflect: str | None = "reflect",
                 max_steps: int = 10, thought_tokens: int = 96, action_tokens: int = 16,
                 argument_tokens: int = 48, tool_errors: str = "observe"):
        if tool_errors not in ("observe", "raise"):
            raise ValueError(f"tool_errors must be 'observe' or 'raise'; got {tool_errors!r}")
        self.tool_errors = tool_errors
        self.templates = templates if templates is not None else ReActTemplates.default()
        t = self.templates
        builtin = {t.finish} | ({t.reflect} if reflect is not None else set())
        self.tools: dict[str, Tool] = {}
        for name, tool in tools.items():
            if not isinstance(name, str) or not _ACTION_RE.fullmatch(name) or "[" in name:
                raise ValueError(f"tool name must be a word; got {name!r}")
            if name.lower() in {b.lower() for b in builtin}:
                raise ValueError(f"tool name {name!r} clashes with the built-in action of that name")
            if (not isinstance(tool, tuple) or len(tool) != 2 or not callable(tool[0])
                    or not isinstance(tool[1], str)):
                raise ValueError(f"tool {name!r} must be a (callable, description) pair; got {tool!r}")
            self.tools[name] = tool
        for role in (plan, action) + ((reflect,) if reflect is not None else ()):
            if not isinstance(role, str) or not role or role == ENV:
                raise ValueError(f"role names must be non-empty strings other than {ENV!r}; got "
                                 f"{role!r}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1; got {max_steps}")
        for name, value in (("thought_tokens", thought_tokens), ("action_tokens", action_tokens),
                            ("argument_tokens", argument_tokens)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.plan, self.action, self.reflect = plan, action, reflect
        self.roles = tuple(dict.fromkeys((plan, action) + ((reflect,) if reflect else ())))
        self.max_steps = max_steps
        self.thought_tokens, self.action_tokens = thought_tokens, action_tokens
        self.argument_tokens = argument_tokens
        self.action_names = tuple(self.tools) + (t.finish,) + ((t.reflect,) if reflect else ())
        self._canonical = {n.lower(): n for n in self.action_names}
        self.instruction = self._render_instruction()

    def _render_instruction(self) -> str:
        t = self.templates
        if "{actions}" not in t.instruction:
            return t.instruction
        descriptions = [d for _, d in self.tools.values()] + [t.finish_description]
        if self.reflect is not None:
            descriptions.append(t.reflect_description)
        lines = "\n".join(t.action_line.format(index=i + 1, description=d)
                          for i, d in enumerate(descriptions))
        return t.instruction.format(actions=lines, count=len(descriptions))

    # -- Workflow API --

    def start(self, task: Any) -> ReActState:
        question = task if isinstance(task, str) else getattr(task, "question", None)
        if not isinstance(question, str):
            raise ValueError(f"a ReAct task must be a string or have a string 'question'; got {task!r}")
        return ReActState(question=question, writer=self.plan)

    def prompt(self, state: ReActState) -> tuple[Segment, ...]:
        return (Segment(ENV, self.instruction),
                Segment(ENV, self.templates.question.format(question=state.question)))

    def next_turn(self, state: ReActState) -> TurnSpec | None:
        t = self.templates
        if state.phase == "done":
            return None
        if state.phase == "thought":
            if state.steps >= self.max_steps:
                self._end(state, answer=None, finished=False, trailing=state.pending)
                return None
            append, state.pending = state.pending + t.thought, ""
            return TurnSpec(state.writer, append, self.thought_tokens, ("\n",))
        if state.phase == "action":
            return TurnSpec(state.writer, t.action, self.action_tokens, ("\n",))
        agent = self.action if state.writer == self.plan else state.writer
        return TurnSpec(agent, t.argument.format(action=state.action_type), self.argument_tokens,
                        (t.argument_close, "\n") if t.argument_close else ("\n",))

    def on_output(self, state: ReActState, text: str) -> None:
        t = self.templates
        if state.phase == "thought":
            state.steps += 1
            state.phase = "action"
        elif state.phase == "action":
            match = _ACTION_RE.fullmatch(text)
            name = self._canonical.get(match.group(1).lower()) if match else None
            if name is None:
                self._observe(state, t.invalid_unknown.format(actions=", ".join(self.action_names)),
                              malformed=True)
            elif match.group(2) is not None:
                self._act(state, name, match.group(2).strip(), close="")
            elif (problem := self._order_problem(state, name)) is not None:
                self._observe(state, problem, malformed=True)  # no argument turn for a bad order
            else:
                state.action_type = name
                state.phase = "argument"
        elif state.phase == "argument":
            self._act(state, state.action_type, text, close=t.argument_close)
        else:
            raise RuntimeError("on_output called on an episode that is over")

    def result(self, state: ReActState) -> EpisodeResult:
        return EpisodeResult(answer=state.answer, finished=state.finished, steps=state.steps,
                             malformed=state.malformed, trailing=state.trailing)

    # -- internals --

    def _order_problem(self, state: ReActState, name: str) -> str | None:
        t = self.templates
        if state.awaiting_reflection and name != t.reflect:
            return t.invalid_need_reflect
        if name == t.reflect and not state.awaiting_reflection:
            return t.invalid_reflect_first
        return None

    def _act(self, state: ReActState, name: str, argument: str, close: str) -> None:
        t = self.templates
        if (problem := self._order_problem(state, name)) is not None:
            return self._observe(state, problem, close, malformed=True)
        if not argument:
            return self._observe(state, t.invalid_empty.format(action=name), close, malformed=True)
        if name == t.finish:
            state.last_finish = argument
            if self.reflect is None:
                return self._end(state, answer=argument, finished=True, trailing=close)
            state.awaiting_reflection = True
            state.writer = self.reflect
            return self._observe(state, t.reflect_request, close)
        if name == t.reflect:
            verdict = argument.lower()
            if verdict == t.right.lower():
                return self._end(state, answer=state.last_finish, finished=True, trailing=close)
            if verdict != t.wrong.lower():
                return self._observe(state, t.invalid_reflect_argument, close, malformed=True)
            state.awaiting_reflection = False
            state.writer = self.plan
            return self._observe(state, t.retry, close)
        function, _ = self.tools[name]
        try:
            observation = str(function(argument))
        except Exception as error:  # by default a tool never ends the episode; the agent sees it
            if self.tool_errors == "raise":
                raise
            observation = f"Error: {type(error).__name__}: {error}"
        return self._observe(state, observation, close)

    def _observe(self, state: ReActState, observation: str, close: str = "", *,
                 malformed: bool = False) -> None:
        state.malformed += int(malformed)
        state.pending = close + self.templates.observation.format(observation=observation)
        state.phase = "thought"

    @staticmethod
    def _end(state: ReActState, *, answer: str | None, finished: bool, trailing: str) -> None:
        state.answer, state.finished, state.trailing = answer, finished, trailing
        state.pending = ""
        state.phase = "done"


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


# --------------------------------------------------------------------------------------------------
# Driver


@dataclasses.dataclass
class _Running:
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
    running: list[_Running] = []
    for index, task in enumerate(tasks):
        episode = _start(workflow, task, first_episode + index)
        running.append(episode)
        if start_hook is not None:
            start_hook(episode.episode, tuple(episode.segments))

    done = 0
    while running:
        batch: list[tuple[_Running, TurnSpec]] = []
        for episode in running:
            spec = _next_spec(workflow, episode)
            if spec is None:
                records[episode.episode - first_episode] = _finish(workflow, episode)
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


def _start(workflow: Workflow, task: Any, episode: int) -> _Running:
    """A running episode on ``task`` with its validated opening env segments."""
    state = workflow.start(task)
    prompt = tuple(workflow.prompt(state))
    for segment in prompt:
        if not isinstance(segment, Segment) or segment.writer != ENV:
            raise ValueError(f"workflow prompt must be env segments; got {segment!r}")
    return _Running(episode, task, state, list(prompt), [])


def _next_spec(workflow: Workflow, episode: _Running) -> TurnSpec | None:
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


def _step(workflow: Workflow, policy: Policy, batch: list[tuple[_Running, TurnSpec]]) -> None:
    requests = [TurnRequest(e.episode, s.agent, s.append, s.max_new_tokens, s.stop) for e, s in batch]
    outputs = list(policy.turns(requests))
    if len(outputs) != len(requests):
        raise ValueError(f"policy.turns returned {len(outputs)} outputs for {len(requests)} requests")
    for (episode, spec), output in zip(batch, outputs):
        _record_output(workflow, episode, spec, output)


def _record_output(workflow: Workflow, episode: _Running, spec: TurnSpec,
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


def _finish(workflow: Workflow, episode: _Running) -> EpisodeRecord:
    result = workflow.result(episode.state)
    segments = list(episode.segments)
    if result.trailing:
        segments.append(Segment(ENV, result.trailing))
    return EpisodeRecord(episode=episode.episode, task=episode.task, segments=tuple(segments),
                         turns=tuple(episode.turns), answer=result.answer, finished=result.finished,
                         steps=result.steps, malformed=result.malformed)


# --------------------------------------------------------------------------------------------------
# Scripted policy and training samples

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


def per_role_samples(record: EpisodeRecord) -> list[dict[str, Any]]:
    """One training sample per role turn, in the published format plus segmentation:
    ``{"input", "output", "role", "segments", "writers"}`` where ``"".join(segments) == input``
    (the text before the turn's output) and ``writers[i]`` wrote ``segments[i]``."""
    samples = []
    for i, segment in enumerate(record.segments):
        if segment.writer == ENV:
            continue
        before = record.segments[:i]
        samples.append({
            "input": "".join(s.text for s in before),
            "output": segment.text,
            "role": segment.writer,
            "segments": [s.text for s in before],
            "writers": [s.writer for s in before],
        })
    return samples
