"""The paper's ScienceQA task, offline: published role files, who wrote each part of their prompts,
the evaluation questions, the tools, the workflow and its scoring.

Published material (``lragent-trajectories``, outside the repository; never copied into it):
- ``scienceqa/{plan,action,reflect}.json``: one ``{"input", "output"}`` sample per role call of
  correct ReAct trajectories (``load_role_files``).
- ``scienceqa-eval/grade{1-4,5-8,9-12}.json``: 360 multiple-choice questions with the image caption
  and OCR that the ``Image2Text`` tool answers from (``load_eval_questions``).

**Writers** (``parse_prompt``, ``segment_prompt``). A published prompt is the instruction, the
question and a scratchpad of steps. Each role's prompts render the earlier steps in that role's own
way: plan prompts as ``Thought: \\n### Response:\\n{thought}\\nAction: \\n### Response:\\n{Type[arg]}``,
action and reflect prompts as ``...{thought}\\nAciton: {Type}[\\n### Response:\\n{arg}]`` (a Reflect
step as ``...{thought}\\nAction: Reflect[...]``), each followed by ``\\nObversation: {text}\\n``.
The role files show who wrote a step: a step whose action is Reflect is reflect's (its thought and
the whole ``Reflect[...]``); in any other step plan wrote the thought and the action type and action
wrote the argument. Brackets, markers, observations, the instruction and the question are env. The
last, unfinished step of a prompt is the sample's own role's (its output follows). This makes the
published files usable in the shared view (``train --view shared|mixed``) and in teacher-forced
replays; a prompt that does not follow the template is refused with the reason.

**Tools**, offline and deterministic: ``Image2Text`` answers from the question's own caption and OCR;
``BingSearch`` and ``Retrieve`` rank, with BM25 (``lragent_jax.tasks.bm25``), the observations those
tools returned in the published trajectories (``PublishedCorpus``), or say that there is no result.

**Workflow** (``ScienceQAWorkflow``): the published instruction and markers, typos kept; the plan /
action / reflect ReAct loop of ``ReActWorkflow``; ``Finish[<letter>]`` scored by exact match of the
option letter (``score_question``).
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lragent_jax.workflow import ENV, ReActState, ReActTemplates, ReActWorkflow, Segment, TurnSpec
from lragent_jax.workflow import samples as samples_format

ROLES = ("plan", "action", "reflect")

# --------------------------------------------------------------------------------------------------
# Published-format role files


def load_role_files(directory: str | os.PathLike,
                    roles: Sequence[str] = ROLES) -> dict[str, list[dict[str, Any]]]:
    """``lragent_jax.workflow.samples.load_role_files`` with the paper's roles by default."""
    return samples_format.load_role_files(directory, roles)


def published_instruction(samples: Sequence[dict[str, Any]], marker: str = "\nQuestion:") -> str:
    """The instruction shared by published samples: the text before ``marker`` in their inputs
    (checked to be identical across them)."""
    prefixes = {s["input"].split(marker, 1)[0] for s in samples if marker in s["input"]}
    if len(prefixes) != 1:
        raise ValueError(f"samples share no single instruction before {marker!r}; found "
                         f"{len(prefixes)} different ones")
    return prefixes.pop()


# --------------------------------------------------------------------------------------------------
# The prompt, as the published trajectories have it (typos kept: the model is trained on them)

INSTRUCTION_HEAD = (
    "I want you to be a good multimodal multiple-choice science questions answerer. Select a "
    "correct option to a multi-choice multi-modal question with interleaving Thought, Action, "
    "Observation steps. Thought can reason about the current situation, and Action can be five "
    "types:\n")
INSTRUCTION_NOTES = (
    "\nNote that to determine the answer, it's needed to consider both the Question and the "
    "available Options.\nNote that Reflect must be the next Action after Finish.\nBingSearch and "
    "Retrieve can be used multi-times.")
TOOL_DESCRIPTIONS = {
    "Image2Text": (
        "Image2Text[image], which generates captions for the image and detects words in the "
        "image.You are recommand to use it first to get more information about the imgage to the "
        "question. If the questions contains image, it will return catption and ocr text, else, it "
        "will return None. For example, Image2Text[image]"),
    "BingSearch": (
        "BingSearch[question], which searches the exact detailed question on the Internet and "
        "returns the relevant information to the query. Be specific and precise with your query to "
        "increase the chances of getting relevant results. For example, instead of searching for "
        "\"dogs,\" you can search for \"popular dog breeds in the United States.\" For example, "
        "BingSearch[Which type of computer networking technology, developed in the 1970s, allows "
        "devices to communicate over a shared network]"),
    "Retrieve": (
        "Retrieve[entity], which retrieves the exact entity on Wikipedia and returns the first "
        "paragraph if it exists. If not, it will return some similar entities to retrieve. For "
        "example, Retrieve[Milhouse]"),
}
FINISH_DESCRIPTION = ("Finish[option], which returns the answer option and finishes the task. For "
                      "example, Finish[A]")
REFLECT_DESCRIPTION = ("Reflect[right/wrong], which reflects the answer right or wrong based on the "
                       "context history. For example, Reflect[right]")
# observations of the published trajectories
NO_IMAGE = "This question doesn't have an image."
INVALID_ACTION = ("Invalid Action. Valid Actions are Retrieve[<topic>] BingSearch[<topic>] "
                  "Finish[<answer>] Image2Text[imgae] and Reflect[right/wrong].")
RETRIEVE_NOT_FOUND = "Could not find that page, please try again."


def scienceqa_templates() -> ReActTemplates:
    """``ReActTemplates.scienceqa()`` with the published instruction (built from the tool
    descriptions above, so ``ScienceQAWorkflow.instruction`` equals the published one) and the
    published messages for invalid actions."""
    base = ReActTemplates.scienceqa()
    return dataclasses.replace(
        base, instruction=INSTRUCTION_HEAD + "{actions}" + INSTRUCTION_NOTES,
        finish_description=FINISH_DESCRIPTION, reflect_description=REFLECT_DESCRIPTION,
        invalid_unknown=INVALID_ACTION)


# --------------------------------------------------------------------------------------------------
# Writers of published prompts

RESPONSE = "\n### Response:\n"
THOUGHT_MARK = "Thought: " + RESPONSE
ACTION_MARK = "\nAction: " + RESPONSE
OBSERVATION_MARK = "\nObversation: "
QUESTION_MARK = "\nQuestion:"
_ARGUMENT_OPEN = re.compile(r"\nAciton: (\w+)\[\n### Response:\n")
_INLINE_ACTION = re.compile(r"\nAction: (?=[^\n])")
_ACTION_TYPE = re.compile(r"\s*(\w+)")
_FULL_ACTION = re.compile(r"(\s*\w+)\[(.*)\](.*)", re.DOTALL)
_BARE_ACTION = re.compile(r"\n(?=\w+\[[^\n]*\nObversation: )")

# how a prompt ends: what the sample's output is
ENDINGS = ("thought", "action", "argument", "reflect_action")


class PublishedFormatError(ValueError):
    """A published prompt does not follow the ScienceQA ReAct template."""


@dataclasses.dataclass(frozen=True)
class ParsedStep:
    """One step of a published scratchpad.

    ``form``: "marked" (``Action: \\n### Response:\\n{action}``, plan prompts), "argument"
    (``Aciton: {type}[\\n### Response:\\n{argument}]``), "inline" (``Action: {action}``), or the
    two forms of this project's own append-only trajectories (``ScienceQAWorkflow``): "typed"
    (``Action: \\n### Response:\\n{type}\\nAciton: {type}[\\n### Response:\\n{argument}]``) and
    "bare" (reflect's ``\\n{action}`` right after its thought). ``action`` is the whole action line
    ("marked", "inline", "bare") or the argument ("argument", "typed"); ``observation`` is None for
    the unfinished last step.
    """

    thought: str | None
    form: str | None
    action_type: str | None
    action: str | None
    observation: str | None

    @property
    def is_reflect(self) -> bool:
        return (self.action_type or "").lower() == "reflect"

    @property
    def argument(self) -> str | None:
        """The action's argument (the text in its brackets), None when it has none."""
        if self.form in ("argument", "typed") or self.action is None:
            return self.action
        match = _FULL_ACTION.fullmatch(self.action)
        return match.group(2) if match else None


@dataclasses.dataclass(frozen=True)
class ParsedPrompt:
    instruction: str
    question: str  # the text between "\nQuestion:" and the first thought marker, ending in "\n"
    steps: tuple[ParsedStep, ...]  # the last one is unfinished (the sample's output completes it)
    ending: str  # one of ENDINGS


def parse_prompt(text: str) -> ParsedPrompt:
    """The structure of a published prompt; raises PublishedFormatError saying where it breaks."""
    q = text.find(QUESTION_MARK)
    if q < 0:
        raise PublishedFormatError(f"no {QUESTION_MARK!r} marker")
    first = text.find("\n" + THOUGHT_MARK, q)
    if first < 0:
        raise PublishedFormatError("no 'Thought: \\n### Response:\\n' marker after the question")
    instruction, question = text[:q], text[q + len(QUESTION_MARK):first + 1]
    pos, n, steps = first + 1, len(text), []
    while True:
        if not text.startswith(THOUGHT_MARK, pos):
            raise PublishedFormatError(f"expected a thought marker at character {pos}: "
                                       f"{text[pos:pos + 40]!r}")
        pos += len(THOUGHT_MARK)
        if pos == n:
            steps.append(ParsedStep(None, None, None, None, None))
            return ParsedPrompt(instruction, question, tuple(steps), "thought")
        end = text.find("\n", pos)
        if end < 0:
            raise PublishedFormatError(f"the thought at character {pos} does not end with a newline")
        thought, pos = text[pos:end], end
        argument = _ARGUMENT_OPEN.match(text, pos)
        inline = _INLINE_ACTION.match(text, pos)
        if text.startswith(ACTION_MARK, pos):
            form, pos = "marked", pos + len(ACTION_MARK)
            if pos == n:
                steps.append(ParsedStep(thought, None, None, None, None))
                return ParsedPrompt(instruction, question, tuple(steps), "action")
            line_end = text.find("\n", pos)
            typed = _ARGUMENT_OPEN.match(text, line_end) if line_end >= 0 else None
            if typed is not None and text[pos:line_end] == typed.group(1):
                # this project's own (append-only) trajectories: the type, then the argument marker
                form, argument, pos = "typed", typed, typed.end()
                if pos == n:
                    steps.append(ParsedStep(thought, form, typed.group(1), None, None))
                    return ParsedPrompt(instruction, question, tuple(steps), "argument")
        elif argument is not None:
            form, pos = "argument", argument.end()
            if pos == n:
                steps.append(ParsedStep(thought, form, argument.group(1), None, None))
                return ParsedPrompt(instruction, question, tuple(steps), "argument")
        elif inline is not None:
            form, pos = "inline", inline.end()
        elif pos == n - 1:  # "{thought}\n": reflect writes its Reflect[...] right after its thought
            steps.append(ParsedStep(thought, None, None, None, None))
            return ParsedPrompt(instruction, question, tuple(steps), "reflect_action")
        elif _BARE_ACTION.match(text, pos):  # reflect's Reflect[...] once the step has gone on
            form, pos = "bare", pos + 1
        else:
            raise PublishedFormatError(f"after the thought at character {pos} expected an action "
                                       f"marker; got {text[pos:pos + 40]!r}")
        end = text.find(OBSERVATION_MARK, pos)
        line_end = text.find("\n", pos)
        if end < 0 or line_end != end:
            raise PublishedFormatError(f"the action at character {pos} is not one line followed by "
                                       f"{OBSERVATION_MARK!r}: {text[pos:pos + 60]!r}")
        line = text[pos:end]
        if form in ("argument", "typed"):
            if not line.endswith("]"):
                raise PublishedFormatError(f"the argument at character {pos} does not end with ']'")
            action_type, action = argument.group(1), line[:-1]
        else:
            match = _ACTION_TYPE.match(line)
            action_type, action = (match.group(1) if match else None), line
        start = end + len(OBSERVATION_MARK)
        end = text.find("\n" + THOUGHT_MARK, start)
        if end < 0:
            raise PublishedFormatError(f"the observation at character {start} is not followed by a "
                                       "thought marker")
        steps.append(ParsedStep(thought, form, action_type, action, text[start:end]))
        pos = end + 1


def _expected_writers(ending: str, last: ParsedStep, plan: str, action: str,
                      reflect: str) -> tuple[str, ...]:
    """Roles whose output may follow a prompt with this ending."""
    if ending in ("thought", "action"):
        return (plan, reflect)
    if ending == "argument":
        return (reflect,) if last.is_reflect else (action,)
    return (reflect,)


def segment_prompt(text: str, role: str, *, plan: str = "plan", action: str = "action",
                   reflect: str = "reflect") -> list[Segment]:
    """Segments (with writers) of a published prompt whose continuation ``role`` writes.

    ``"".join`` of the texts is ``text``. The segments follow the trajectory's turns, as
    ``run_episodes`` records them: the instruction and the question are the first two env
    segments, then each role span is preceded by one env segment holding all env text since the
    previous role span. Raises PublishedFormatError when the prompt does not follow the template or
    ``role`` cannot write what comes next.
    """
    parsed = parse_prompt(text)
    allowed = _expected_writers(parsed.ending, parsed.steps[-1], plan, action, reflect)
    if role not in allowed:
        raise PublishedFormatError(f"a prompt ending in a {parsed.ending.replace('_', ' ')} marker "
                                   f"is continued by {' or '.join(allowed)}, not {role!r}")
    pieces: list[tuple[str, str]] = [(ENV, THOUGHT_MARK)]
    for index, step in enumerate(parsed.steps):
        unfinished = index == len(parsed.steps) - 1
        if unfinished and parsed.ending in ("action", "reflect_action"):
            writer = role  # the output says whose step it is: plan's type or reflect's Reflect[..]
        else:
            writer = reflect if step.is_reflect else plan
        arguer = action if writer == plan else writer
        if index:
            pieces.append((ENV, OBSERVATION_MARK + parsed.steps[index - 1].observation + "\n"
                           + THOUGHT_MARK))
        if step.thought is None:
            break
        pieces.append((writer, step.thought))
        if step.form == "marked":
            pieces.append((ENV, ACTION_MARK))
            if step.action is not None:
                pieces += _split_action(step.action, writer, arguer, step.is_reflect)
        elif step.form == "argument":
            pieces += [(ENV, "\nAciton: "), (writer, step.action_type), (ENV, "[" + RESPONSE)]
            if step.action is not None:
                pieces += [(arguer, step.action), (ENV, "]")]
        elif step.form == "typed":
            pieces += [(ENV, ACTION_MARK), (writer, step.action_type),
                       (ENV, "\nAciton: " + step.action_type + "[" + RESPONSE)]
            if step.action is not None:
                pieces += [(arguer, step.action), (ENV, "]")]
        elif step.form in ("inline", "bare"):
            pieces.append((ENV, "\nAction: " if step.form == "inline" else "\n"))
            pieces += _split_action(step.action, writer, arguer, step.is_reflect)
        elif parsed.ending == "action":
            pieces.append((ENV, ACTION_MARK))
        else:  # reflect_action
            pieces.append((ENV, "\n"))
    segments = [Segment(ENV, parsed.instruction), Segment(ENV, QUESTION_MARK + parsed.question)]
    for writer, piece in pieces:
        if not piece:
            continue
        if writer == ENV and len(segments) > 2 and segments[-1].writer == ENV:
            segments[-1] = Segment(ENV, segments[-1].text + piece)
        else:
            segments.append(Segment(writer, piece))
    if "".join(s.text for s in segments) != text:  # pragma: no cover - the parser's invariant
        raise PublishedFormatError("internal error: segments do not reproduce the prompt")
    return segments


def _split_action(line: str, writer: str, arguer: str, is_reflect: bool) -> list[tuple[str, str]]:
    """A whole action line: reflect's Reflect[...] is all reflect's; otherwise ``Type`` is the
    step writer's and the argument ``arguer``'s, with the brackets (and any text after the closing
    one, which no turn produces at inference) env."""
    match = _FULL_ACTION.fullmatch(line)
    if is_reflect or match is None:
        return [(writer, line)]
    return [(writer, match.group(1)), (ENV, "["), (arguer, match.group(2)),
            (ENV, "]" + match.group(3))]


def segment_published_sample(sample: Mapping[str, Any], role: str, **names: str) -> list[Segment]:
    """``segment_prompt`` of the sample's input, then its output as ``role``'s segment."""
    return segment_prompt(sample["input"], role, **names) + [Segment(role, sample["output"])]


_OTHER_TEMPLATE = re.compile(r"\nObservation: |\nAction: \w+\[\n### Response:\n")


def is_published_format(sample: Mapping[str, Any]) -> bool:
    """Whether a sample's prompt is in the ScienceQA template, so writers can be recovered from it:
    a question and a thought marker, and none of the correctly spelled markers of
    ``ReActTemplates.default()`` (the published files always write "Obversation" and "Aciton")."""
    text = sample.get("input", "")
    return (QUESTION_MARK in text and ("\n" + THOUGHT_MARK) in text
            and _OTHER_TEMPLATE.search(text) is None)


def attach_writers(samples: Mapping[str, Sequence[Mapping[str, Any]]], *, source: str = "",
                   plan: str = "plan", action: str = "action",
                   reflect: str = "reflect") -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Adds ``"segments"`` / ``"writers"`` (``segment_prompt``) to every published-format sample
    that has none. Returns (new samples, count of samples segmented per role). Raises
    PublishedFormatError naming ``source``/``<role>.json``, the record index and the reason for a
    published-format sample that does not parse."""
    out: dict[str, list[dict]] = {}
    counts: dict[str, int] = {}
    for role, items in samples.items():
        out[role], counts[role] = [], 0
        for index, sample in enumerate(items):
            if "writers" in sample or not is_published_format(sample):
                out[role].append(dict(sample))
                continue
            try:
                segments = segment_prompt(sample["input"], role, plan=plan, action=action,
                                          reflect=reflect)
            except PublishedFormatError as error:
                where = f"{source}/{role}.json" if source else f"{role}.json"
                raise PublishedFormatError(f"{where}: record {index}: {error}") from None
            out[role].append(samples_format.with_writers(sample, segments))
            counts[role] += 1
    return out, counts


# --------------------------------------------------------------------------------------------------
# Evaluation questions

GRADE_BANDS = ("grade1-4", "grade5-8", "grade9-12")
LETTERS = "ABCDEFGHIJ"
_NO_IMAGE = "no img"


@dataclasses.dataclass(frozen=True)
class ScienceQuestion:
    """One published evaluation question. ``question`` is the text the prompt shows after
    ``Question:``, with the options written as in the training prompts (``Options:(A) x (B) y``);
    ``answer`` is the option letter; ``caption`` is None for a question without an image."""

    id: str
    question: str
    answer: str
    choices: tuple[str, ...]
    caption: str | None
    ocr: str
    band: str
    grade: int
    subject: str
    topic: str = ""
    category: str = ""

    @property
    def level(self) -> int:
        """The grade (``tasks.scoring`` groups outcomes by ``level``)."""
        return self.grade

    @property
    def chance(self) -> float:
        """Probability that a uniformly random option is right."""
        return 1.0 / len(self.choices)


def ocr_text(raw: str) -> str:
    """The published OCR fields are EasyOCR's raw ``[(box, text, confidence), ...]`` lists as
    strings: the texts, comma-separated as the training observations show OCR results. A field
    that is not such a list (or an empty one, "[]") is returned as it is."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw
    if not isinstance(value, list) or not value:
        return raw
    texts = [item[1] for item in value
             if isinstance(item, (list, tuple)) and len(item) >= 2 and isinstance(item[1], str)]
    return ",".join(texts) if len(texts) == len(value) else raw


def _question_from_record(record: Any, band: str, where: str) -> ScienceQuestion:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object; got {type(record).__name__}")
    for key, kind in (("Question", str), ("choices", list), ("caption", str), ("orc", str),
                      ("Answer", str), ("metadata", dict), ("pid", (str, int))):
        if not isinstance(record.get(key), kind):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ValueError(f"{where}: {key!r} is missing or not a {expected}")
    choices = tuple(str(c) for c in record["choices"])
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"{where}: {len(choices)} choices; 2..{len(LETTERS)} are supported")
    answer = record["Answer"].strip()
    if answer not in LETTERS[:len(choices)]:
        raise ValueError(f"{where}: answer {answer!r} is not one of the options "
                         f"{', '.join(LETTERS[:len(choices)])}")
    stem, sep, options = record["Question"].rpartition("\nOptions:")
    listed = " ".join(f"({letter}) {choice}" for letter, choice in zip(LETTERS, choices))
    if not sep or options.strip() != listed:
        raise ValueError(f"{where}: the question's options {options.strip()!r:.120} do not list its "
                         f"choices {listed!r:.120}")
    meta = record["metadata"]
    caption = None if record["caption"] == _NO_IMAGE else record["caption"]
    return ScienceQuestion(
        id=str(record["pid"]), question=f"{stem}\nOptions:{listed}", answer=answer,
        choices=choices, caption=caption, ocr=ocr_text(record["orc"]), band=band,
        grade=int(meta.get("grade", 0)), subject=str(meta.get("subject", "")),
        topic=str(meta.get("topic", "")), category=str(meta.get("category", "")))


def load_eval_questions(directory: str | os.PathLike,
                        bands: Sequence[str] = GRADE_BANDS) -> list[ScienceQuestion]:
    """The questions of ``<band>.json`` for each grade band, band by band in file order. Raises
    ValueError naming the file and record on any problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory of ScienceQA evaluation files")
    questions, seen = [], set()
    for band in bands:
        path = directory / f"{band}.json"
        if not path.is_file():
            raise ValueError(f"{path}: evaluation file is missing (expected {', '.join(bands)})")
        for index, record in enumerate(samples_format.read_json_list(path, "questions")):
            question = _question_from_record(record, band, f"{path}: record {index}")
            if question.id in seen:
                raise ValueError(f"{path}: record {index}: duplicate pid {question.id!r}")
            seen.add(question.id)
            questions.append(question)
    return questions


def select_questions(questions: Sequence[ScienceQuestion],
                     count: int | None) -> list[ScienceQuestion]:
    """The first ``count`` questions taking the bands in turn (all when None), so a subset covers
    every grade band evenly."""
    by_band: dict[str, list[ScienceQuestion]] = {}
    for q in questions:
        by_band.setdefault(q.band, []).append(q)
    order, depth = [], max((len(v) for v in by_band.values()), default=0)
    for i in range(depth):
        order += [v[i] for v in by_band.values() if i < len(v)]
    if count is None:
        return order
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"question count must be an int >= 1; got {count!r}")
    return order[:count]


def chance_level(questions: Sequence[ScienceQuestion]) -> float:
    """Expected accuracy of picking an option uniformly at random."""
    return sum(q.chance for q in questions) / len(questions) if questions else math.nan


# --------------------------------------------------------------------------------------------------
# Offline tools


def _entity_key(text: str) -> str:
    return " ".join(text.strip().strip("\"'[]().").lower().split())


_TOOL_ERRORS = ("Invalid", "BingSearch error", "Search error", "Bing search error", "Could not find")


class PublishedCorpus:
    """What ``BingSearch`` and ``Retrieve`` returned in the published trajectories, as an offline
    source for the same tools.

    ``search_documents``: the distinct BingSearch observations; ``pages``: entity -> the
    paragraph Retrieve returned for it. ``bing_search(query)`` returns the best BM25 match among
    the documents when at least ``min_coverage`` of the query's terms occur in it, else says there is
    no result. ``retrieve(entity)`` returns the page of that entity (case and surrounding
    punctuation ignored), else the page whose entity name holds every term of it, else the names
    of similar entities (best BM25 matches of the names, else of the pages), in the published
    Retrieve's words.
    """

    def __init__(self, search_documents: Sequence[str] = (), pages: Mapping[str, str] | None = None,
                 *, min_coverage: float = 0.5, similar: int = 5):
        from lragent_jax.tasks.bm25 import BM25

        if not 0.0 <= min_coverage <= 1.0:
            raise ValueError(f"min_coverage must be in [0, 1]; got {min_coverage}")
        self.search_documents = tuple(dict.fromkeys(search_documents))
        pages = dict(pages or {})
        self.pages = {_entity_key(k): v for k, v in sorted(pages.items())}
        self.titles = {_entity_key(k): k.strip() for k in sorted(pages)}
        self.min_coverage, self.similar = min_coverage, similar
        self._search = BM25(self.search_documents)
        self._page_keys = tuple(self.pages)
        self._page_text = BM25([self.pages[k] for k in self._page_keys])
        self._page_titles = BM25(list(self._page_keys))

    @classmethod
    def from_role_samples(cls, samples: Mapping[str, Sequence[Mapping[str, Any]]],
                          **options) -> PublishedCorpus:
        """Collects every finished BingSearch / Retrieve step of every published prompt (prompts
        that do not follow the template are skipped: they hold no usable steps)."""
        documents, pages = set(), {}
        for items in samples.values():
            for sample in items:
                try:
                    steps = parse_prompt(sample["input"]).steps[:-1]
                except PublishedFormatError:
                    continue
                for step in steps:
                    kind = (step.action_type or "").lower()
                    text = step.observation or ""
                    if not text.strip() or text.startswith(_TOOL_ERRORS):
                        continue
                    if kind == "bingsearch":
                        documents.add(text)
                    elif kind == "retrieve" and step.argument and _entity_key(step.argument):
                        pages.setdefault(step.argument.strip().strip(".").strip(), text)
        return cls(sorted(documents), pages, **options)

    @classmethod
    def from_folder(cls, directory: str | os.PathLike, **options) -> PublishedCorpus:
        return cls.from_role_samples(load_role_files(directory), **options)

    def describe(self) -> dict[str, int]:
        return {"search_documents": len(self.search_documents), "pages": len(self.pages)}

    def bing_search(self, query: str) -> str:
        query = query.strip()
        hits = self._search.search(query, 1)
        if hits and self._search.coverage(query, hits[0][0]) >= self.min_coverage:
            return self.search_documents[hits[0][0]]
        return f"BingSearch found no results for [{query}]."

    def retrieve(self, entity: str) -> str:
        key = _entity_key(entity)
        if key in self.pages:
            return self.pages[key]
        hits = self._page_titles.search(entity, self.similar)
        if hits and self._page_titles.coverage(entity, hits[0][0]) == 1.0:
            return self.pages[self._page_keys[hits[0][0]]]
        similar = [self.titles[self._page_keys[i]]
                   for i, _ in (hits or self._page_text.search(entity, self.similar))]
        if not similar:
            return RETRIEVE_NOT_FOUND
        return f"Could not find [{entity.strip()}]. Similar: {similar!r}"


def image2text(question: ScienceQuestion) -> str:
    """The Image2Text observation of a question: its caption and OCR, or that it has no image."""
    if question.caption is None:
        return NO_IMAGE
    return f"Image caption: {question.caption} OCR result: {question.ocr}"


# --------------------------------------------------------------------------------------------------
# The workflow


@dataclasses.dataclass
class ScienceQAState(ReActState):
    task: Any = None


class ScienceQAWorkflow(ReActWorkflow):
    """The ReAct loop of ``ReActWorkflow`` with the published prompt, markers and tools.

    Differences from the plain loop, each to match the published trajectories: reflect writes its
    ``Reflect[...]`` right after its thought and a newline (no action marker); an action is parsed
    after stripping spaces and dots at its ends; a Reflect argument other than right or wrong counts
    as a malformed action and, as in the paper's loop, as wrong (the plan tries again). Tasks are
    ``ScienceQuestion``s: ``Image2Text`` answers from the episode's own question.

    ``on_output`` is not reentrant (the episode's question is held while its tool runs).
    """

    def __init__(self, corpus: PublishedCorpus | None = None, *, max_steps: int = 8,
                 thought_tokens: int = 64, action_tokens: int = 8, argument_tokens: int = 32,
                 plan: str = "plan", action: str = "action", reflect: str = "reflect"):
        self.corpus = corpus if corpus is not None else PublishedCorpus()
        self._task: ScienceQuestion | None = None
        tools = {"Image2Text": (self._image2text, TOOL_DESCRIPTIONS["Image2Text"]),
                 "BingSearch": (self.corpus.bing_search, TOOL_DESCRIPTIONS["BingSearch"]),
                 "Retrieve": (self.corpus.retrieve, TOOL_DESCRIPTIONS["Retrieve"])}
        super().__init__(tools, templates=scienceqa_templates(), plan=plan, action=action,
                         reflect=reflect, max_steps=max_steps, thought_tokens=thought_tokens,
                         action_tokens=action_tokens, argument_tokens=argument_tokens)

    def _image2text(self, argument: str) -> str:
        if self._task is None:  # pragma: no cover - tools run only inside on_output
            raise RuntimeError("Image2Text ran outside an episode")
        return image2text(self._task)

    def start(self, task: Any) -> ScienceQAState:
        if not isinstance(task, ScienceQuestion):
            raise ValueError(f"a ScienceQA task must be a ScienceQuestion; got {type(task).__name__}")
        return ScienceQAState(question=task.question, writer=self.plan, task=task)

    def next_turn(self, state: ScienceQAState) -> TurnSpec | None:
        spec = super().next_turn(state)
        if spec is not None and state.phase == "action" and state.writer == self.reflect:
            return dataclasses.replace(spec, append="\n")
        return spec

    def on_output(self, state: ScienceQAState, text: str) -> None:
        t = self.templates
        if state.phase == "action":
            text = text.strip(" ").strip(".")
            match = re.fullmatch(r"(\w+)\s*\[(.*)\]", text, re.DOTALL)
            if (match and match.group(1).lower() == t.reflect.lower()
                    and state.awaiting_reflection and not self._verdict(match.group(2))):
                state.malformed += 1
                text = f"{t.reflect}[{t.wrong}]"
        elif (state.phase == "argument" and state.action_type == t.reflect
              and state.awaiting_reflection and not self._verdict(text)):
            state.malformed += 1
            text = t.wrong
        self._task = state.task
        try:
            super().on_output(state, text)
        finally:
            self._task = None

    def _verdict(self, argument: str) -> bool:
        return argument.strip().lower() in (self.templates.right.lower(),
                                            self.templates.wrong.lower())


def score_question(record: Any):
    """``tasks.scoring.EpisodeOutcome`` of an episode on a ``ScienceQuestion``: correct when it
    finished with exactly the gold option letter (case, brackets and a trailing dot ignored)."""
    from lragent_jax.tasks.scoring import score_episode

    task = record.task
    return score_episode(record, task.answer, level=task.grade, id=task.id)
