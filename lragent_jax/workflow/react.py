"""The paper's ReAct loop (plan / action / reflect) as a ``Workflow``, and its env text.

Host-side only: pure Python, no jax.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

from lragent_jax.workflow.types import ENV, EpisodeResult, Segment, TurnSpec, Workflow


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
