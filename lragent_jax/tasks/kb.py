"""A built-in, offline multi-hop QA task over a synthetic knowledge base, with gold trajectories.

Every split (train / valid / test) has its own small world of people, cities, companies and
countries with made-up, pronounceable names, so a pretrained model cannot know the answers and must
use the tools, and no name (not even one word of one) is shared between splits. Questions follow 1,
2 or 3 relations ("level" = hops), some end with a calculation; answers are a name or a number.

Gold trajectories are produced by running ``ReActWorkflow`` with a ``ScriptedPolicy`` gold agent,
i.e. through the same driver and templates as inference. The gold agent checks that every value it
states was in the observation just appended, so each gold episode is a valid tool-using solution.
A share ``wrong_answer_rate`` of episodes first finishes with a wrong answer (stopping one hop early
or misreading the last observation), which reflect rejects before the plan retries.

Everything is deterministic by seed. ``KBTask.write_role_files`` writes the role samples in the
published format (``lragent_jax.workflow.samples``, read back with ``load_role_files``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import operator
import os
import random
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lragent_jax.workflow import (EpisodeRecord, ReActTemplates, ReActWorkflow, ScriptedPolicy,
                                  Segment, Tool, TurnRequest, run_episodes)
from lragent_jax.workflow.samples import group_by_role, write_role_files

SPLITS = ("train", "valid", "test")
ROLES = ("plan", "action", "reflect")

# kind -> attributes, in fact-sheet order; values are years, numbers or names of other entities
ATTRIBUTES = {
    "person": ("born", "city", "employer"),
    "city": ("country", "population"),
    "company": ("founded", "ceo", "headquarters"),
}
_NUMERIC = {"born", "founded", "population"}

# How a relation is described ("the X of E") and stated ("E ... V") in questions and gold thoughts.
_DESCRIBE = {
    "born": "the birth year of {e}", "city": "the home city of {e}", "employer": "the employer of {e}",
    "country": "the country of {e}", "population": "the population of {e}",
    "founded": "the founding year of {e}", "ceo": "the CEO of {e}",
    "headquarters": "the headquarters city of {e}",
}
_STATE = {
    "born": "{e} was born in {v}", "city": "{e} lives in {v}", "employer": "{e} works at {v}",
    "country": "{e} is in {v}", "population": "The population of {e} is {v}",
    "founded": "{e} was founded in {v}", "ceo": "The CEO of {e} is {v}",
    "headquarters": "{e} is headquartered in {v}",
}
_ASK = {
    "born": "In which year was {x} born?", "city": "In which city does {x} live?",
    "employer": "Which company does {x} work for?", "country": "In which country is {x}?",
    "population": "What is the population of {x}?", "founded": "In which year was {x} founded?",
    "ceo": "Who is the CEO of {x}?", "headquarters": "In which city is {x} headquartered?",
}
_ASK_YEARS = {  # calculation questions on a path ending in a year: answer = year - value
    "born": ("How old does {x} turn in {year}?", "the age of {x} in {year}"),
    "founded": ("How many years before {year} was {x} founded?",
                "the number of years from the founding of {x} to {year}"),
}
# Relation paths from a start kind; level = number of hops.
PATHS = {
    "person": (("born",), ("city",), ("employer",), ("city", "country"), ("city", "population"),
               ("employer", "founded"), ("employer", "ceo"), ("employer", "headquarters"),
               ("employer", "headquarters", "country"), ("employer", "headquarters", "population"),
               ("employer", "ceo", "born"), ("employer", "ceo", "city")),
    "company": (("founded",), ("ceo",), ("headquarters",), ("ceo", "born"), ("ceo", "city"),
                ("headquarters", "country"), ("headquarters", "population"),
                ("ceo", "city", "country"), ("ceo", "city", "population")),
    "city": (("country",), ("population",)),
}

TOOL_DESCRIPTIONS = {
    "Search": "Search[entity], which returns the facts about a person, city or company.",
    "Lookup": ("Lookup[entity, attribute], which returns one attribute: born, city, employer "
               "(person); country, population (city); founded, ceo, headquarters (company)."),
    "Calculate": "Calculate[expression], which computes arithmetic such as 2030 - 1975.",
}


# --------------------------------------------------------------------------------------------------
# Knowledge base and tools


@dataclasses.dataclass(frozen=True)
class Entity:
    name: str
    kind: str  # "person" | "city" | "company" | "country"
    attributes: tuple[tuple[str, str], ...] = ()

    def get(self, attribute: str) -> str | None:
        return dict(self.attributes).get(attribute)

    def fact_sheet(self) -> str:
        a = dict(self.attributes)
        if self.kind == "person":
            return (f"{self.name} is a person, born in {a['born']}, who lives in {a['city']} and "
                    f"works at {a['employer']}.")
        if self.kind == "city":
            return (f"{self.name} is a city in {a['country']} with a population of "
                    f"{a['population']}.")
        if self.kind == "company":
            return (f"{self.name} is a company founded in {a['founded']}, headquartered in "
                    f"{a['headquarters']}, whose CEO is {a['ceo']}.")
        return f"{self.name} is a {self.kind}."


def _key(name: str) -> str:
    return " ".join(name.lower().split())


class KnowledgeBase:
    """Entities by name, and the text tools over them (``search``, ``lookup``)."""

    def __init__(self, entities: Sequence[Entity]):
        self.entities = tuple(entities)
        self._by_key = {}
        for entity in self.entities:
            if _key(entity.name) in self._by_key:
                raise ValueError(f"duplicate entity name {entity.name!r}")
            self._by_key[_key(entity.name)] = entity

    def __getitem__(self, name: str) -> Entity:
        return self._by_key[_key(name)]

    def of_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]

    def _find(self, name: str) -> tuple[Entity | None, str]:
        name = name.strip().strip("\"'")
        entity = self._by_key.get(_key(name))
        if entity is not None:
            return entity, ""
        close = difflib.get_close_matches(_key(name), list(self._by_key), n=3, cutoff=0.75)
        similar = ", ".join(self._by_key[k].name for k in close)
        return None, f"There is no entity named {name}." + (f" Similar: {similar}." if close else "")

    def search(self, query: str) -> str:
        entity, error = self._find(query)
        return entity.fact_sheet() if entity is not None else error

    def lookup(self, query: str) -> str:
        name, sep, attribute = query.rpartition(",")
        if not sep:
            return "Lookup needs an entity and an attribute, such as Lookup[Tavo Kelin, born]."
        entity, error = self._find(name)
        if entity is None:
            return error
        value = entity.get(attribute.strip().lower())
        if value is None:
            names = ", ".join(a for a, _ in entity.attributes) or "none"
            return f"{entity.name} has no attribute {attribute.strip()}. Attributes: {names}."
        return value


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> str:
    """Safe arithmetic (numbers, + - * / // % **, parentheses); never evaluates code."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expression.strip())  # 1,200 -> 1200
    if not text or len(text) > 200:
        return "Cannot calculate an empty or overlong expression."
    try:
        tree = ast.parse(text, mode="eval")
        value = _evaluate(tree.body)
    except ZeroDivisionError:
        return "Cannot calculate: division by zero."
    except (SyntaxError, ValueError, TypeError, OverflowError):
        return f"Cannot calculate {expression.strip()}."
    return format_number(value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise ValueError("exponent too large")
        value = _BINARY[type(node.op)](left, right)
        if abs(value) > 1e15:
            raise ValueError("result too large")
        return value
    raise ValueError(f"unsupported expression element {type(node).__name__}")


def format_number(value: int | float) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not finite")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.6g}"


# --------------------------------------------------------------------------------------------------
# World generation

_ONSETS = "b br d dr f fl g gr h k kl l m n p pr r s st t tr v z".split()
_VOWELS = "a e i o u a e i o".split()
_CODAS = ["", "", "", "n", "r", "l", "s"]
_ENDINGS = {  # appended to the last syllable; each kind sounds a little different
    "first": ["", "", "n", "s", "l"],
    "last": ["", "n", "r", "ll", "v", "z"],
    "city": ["ra", "lo", "dun", "mar", "ton", "via"],
    "company": ["x", "x", "n", "r", "tek"],
    "country": ["ia", "land", "esh", "or"],
}


def _word(rng: random.Random, style: str, split_index: int, used: set[str]) -> str:
    """A fresh capitalised word whose stable hash assigns it to this split (so splits share none)."""
    while True:
        syllables = rng.choice((2, 2, 3)) if style == "last" else 2
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(syllables - 1))
        word += rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_ENDINGS[style])
        word = word.capitalize()
        if (4 <= len(word) <= 9 and word not in used
                and zlib.crc32(word.lower().encode()) % len(SPLITS) == split_index):
            used.add(word)
            return word


def build_world(seed: int, split: str, num_people: int) -> KnowledgeBase:
    """The split's world: ``num_people`` people and proportionally many cities, companies, countries.
    Every company's CEO is one of its own employees."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    rng = random.Random(f"lragent-kb:{seed}:{split}:world")
    index, used = SPLITS.index(split), set()
    num_companies = max(4, num_people // 5)
    num_cities = max(5, num_people // 4)
    num_countries = max(3, num_cities // 3)
    countries = [_word(rng, "country", index, used) for _ in range(num_countries)]
    cities = [_word(rng, "city", index, used) for _ in range(num_cities)]
    companies = [_word(rng, "company", index, used) for _ in range(num_companies)]
    people = []
    while len(people) < num_people:
        name = f"{_word(rng, 'first', index, used)} {_word(rng, 'last', index, used)}"
        people.append(name)
    ceos = dict(zip(companies, people))  # the first people run the companies (names are random)
    entities = [Entity(c, "country") for c in countries]
    for i, city in enumerate(cities):
        country = countries[i] if i < len(countries) else rng.choice(countries)
        entities.append(Entity(city, "city", (("country", country),
                                              ("population", str(rng.randrange(20, 30000) * 100)))))
    for company in companies:
        entities.append(Entity(company, "company", (
            ("founded", str(rng.randrange(1850, 2016))), ("ceo", ceos[company]),
            ("headquarters", rng.choice(cities)))))
    employers = {person: company for company, person in ceos.items()}
    for person in people:
        entities.append(Entity(person, "person", (
            ("born", str(rng.randrange(1940, 2006))), ("city", rng.choice(cities)),
            ("employer", employers.get(person) or rng.choice(companies)))))
    return KnowledgeBase(entities)


def kb_tools(kb: KnowledgeBase) -> dict[str, Tool]:
    return {"Search": (kb.search, TOOL_DESCRIPTIONS["Search"]),
            "Lookup": (kb.lookup, TOOL_DESCRIPTIONS["Lookup"]),
            "Calculate": (calculate, TOOL_DESCRIPTIONS["Calculate"])}


# --------------------------------------------------------------------------------------------------
# Questions and gold solutions


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    question: str
    answer: str
    level: int
    start: str                    # entity the question is about
    path: tuple[str, ...]         # relations followed from ``start``
    year: int | None = None       # set for calculation questions: answer = year - final value

    @property
    def uses_calculation(self) -> bool:
        return self.year is not None


@dataclasses.dataclass(frozen=True)
class _Step:
    """One tool call of a gold solution and the sentences the gold agent says around it."""

    tool: str
    argument: str
    value: str        # what the observation must contain, and the step's result
    need: str         # "to find the CEO of Brivex" / "to calculate 2030 - 1975"
    fact: str         # "The CEO of Brivex is Mara Tilden"
    describe: str     # "the CEO of Brivex" (used when the value is wrongly given as the answer)


def _phrase(start: str, path: Sequence[str]) -> str:
    x = start
    for attribute in path:
        x = _DESCRIBE[attribute].format(e=x)
    return x


def make_questions(kb: KnowledgeBase, split: str, count: int, seed: int,
                   levels: Sequence[int] = (1, 2, 3), calculation_rate: float = 0.3) -> list[Question]:
    """``count`` distinct questions, levels in turn; a share ``calculation_rate`` of them ends with
    a calculation (on paths that end in a year)."""
    rng = random.Random(f"lragent-kb:{seed}:{split}:questions")
    candidates = {level: [(kind, path) for kind, paths in PATHS.items() for path in paths
                          if len(path) == level] for level in levels}
    questions, seen = [], set()
    for _ in range(count * 50):
        if len(questions) == count:
            break
        level = levels[len(questions) % len(levels)]
        with_year = rng.random() < calculation_rate
        options = [(k, p) for k, p in candidates[level] if not with_year or p[-1] in _ASK_YEARS]
        kind, path = rng.choice(options)
        start = rng.choice(kb.of_kind(kind)).name
        value = start
        for attribute in path:
            value = kb[value].get(attribute)
        if value == start:  # "Who is the CEO of the employer of X?" where X is that CEO
            continue
        x = _phrase(start, path[:-1])
        year = None
        if with_year:
            year = rng.randrange(2025, 2036)
            text = _ASK_YEARS[path[-1]][0].format(x=x, year=year)
            answer = str(year - int(value))
        else:
            text = _ASK[path[-1]].format(x=x)
            answer = value
        text = text[0].upper() + text[1:]
        if text in seen:
            continue
        seen.add(text)
        questions.append(Question(f"{split}-{len(questions):05d}", text, answer, level, start,
                                  tuple(path), year))
    if len(questions) < count:
        raise ValueError(f"the {split} world supports only {len(questions)} distinct questions; "
                         f"asked for {count}")
    return questions


def _gold_steps(kb: KnowledgeBase, q: Question, rng: random.Random,
                search_rate: float) -> list[_Step]:
    steps, entity = [], q.start
    for attribute in q.path:
        value = kb[entity].get(attribute)
        use_search = rng.random() < search_rate
        steps.append(_Step(
            tool="Search" if use_search else "Lookup",
            argument=entity if use_search else f"{entity}, {attribute}",
            value=value, need="to find " + _DESCRIBE[attribute].format(e=entity),
            fact=_STATE[attribute].format(e=entity, v=value),
            describe=_DESCRIBE[attribute].format(e=entity)))
        entity = value
    if q.year is not None:
        expression = f"{q.year} - {entity}"
        steps.append(_Step("Calculate", expression, q.answer, f"to calculate {expression}",
                           f"The result is {q.answer}", f"the result of {expression}"))
    return steps


def _goal(q: Question) -> str:
    x = _phrase(q.start, q.path[:-1])
    if q.year is not None:
        return _ASK_YEARS[q.path[-1]][1].format(x=x, year=q.year)
    return _DESCRIBE[q.path[-1]].format(e=x)


def _misread(kb: KnowledgeBase, q: Question, value: str, rng: random.Random) -> str:
    if value.lstrip("-").isdigit():
        delta = rng.choice((1, 2, 3)) if abs(int(value)) < 10000 else rng.choice((100, 1000))
        return str(int(value) + rng.choice((-1, 1)) * delta)
    kind = kb[value].kind
    return rng.choice([e.name for e in kb.of_kind(kind) if e.name != value])


GoldTurn = tuple[str, str, str | None]  # (agent, text, string the turn's appended env text must hold)


def gold_script(kb: KnowledgeBase, q: Question, templates: ReActTemplates, rng: random.Random, *,
                wrong_first: bool, search_rate: float = 0.3) -> list[GoldTurn]:
    """The gold agent's turns for one question, in order. With ``wrong_first`` the plan first
    finishes with a wrong answer (one step early when possible, else a misread value), reflect
    rejects it, and the plan goes on to the right answer."""
    steps = _gold_steps(kb, q, rng, search_rate)
    goal = _goal(q)
    turns: list[GoldTurn] = []

    def cycle(writer: str, thought: str, expect: str | None, action: str, argument: str) -> None:
        turns.append((writer, thought, expect))
        if writer == "reflect":
            turns.append((writer, f"{action}[{argument}]", None))
        else:
            turns.extend([(writer, action, None), ("action", argument, None)])

    def reflect(right: bool, why: str) -> None:
        verdict = templates.right if right else templates.wrong
        cycle("reflect", why, templates.reflect_request, templates.reflect, verdict)

    early = rng.randrange(len(steps) - 1) if wrong_first and len(steps) > 1 else None
    if early is not None and rng.random() < 0.5:
        early = None  # misread instead, so reflect sees both kinds of mistakes on multi-step questions
    if early is not None and steps[early].value == q.answer:
        early = None
    for i, step in enumerate(steps):
        if i == 0:
            thought, expect = f"I need {step.need}.", None
        else:  # right after a rejected early answer, the retry message replaces the observation
            expect = templates.retry if early == i - 1 else steps[i - 1].value
            thought = f"{steps[i - 1].fact}. Now I need {step.need}."
        cycle("plan", thought, expect, step.tool, step.argument)
        if early == i:
            cycle("plan", f"{step.fact}. So the answer is {step.value}.", step.value,
                  templates.finish, step.value)
            reflect(False, f"{step.value} is {step.describe}, not {goal}.")
    last = steps[-1]
    if wrong_first and early is None:
        wrong = _misread(kb, q, last.value, rng)
        assert last.fact.endswith(last.value)  # every fact sentence ends with its value
        misread_fact = last.fact[:-len(last.value)] + wrong
        cycle("plan", f"{misread_fact}. So the answer is {wrong}.",
              last.value, templates.finish, wrong)
        reflect(False, f"The observation says {last.value}, not {wrong}.")
        cycle("plan", f"{last.fact}. So the answer is {q.answer}.", templates.retry,
              templates.finish, q.answer)
    else:
        cycle("plan", f"{last.fact}. So the answer is {q.answer}.", last.value, templates.finish,
              q.answer)
    reflect(True, f"{q.answer} is {goal}.")
    return turns


# --------------------------------------------------------------------------------------------------
# The task


class KBTask:
    """The synthetic knowledge-base task: splits, tools, workflow, gold episodes and role samples.

    ``levels``: hop counts to draw questions from, in turn. ``wrong_answer_rate``: share of gold
    episodes whose first Finish is wrong (reflect says wrong, the plan retries).
    ``calculation_rate``: share of questions ending in a Calculate step. ``search_rate``: share of
    gold hops that use Search (the whole fact sheet) instead of Lookup.
    """

    def __init__(self, seed: int = 0, num_train: int = 2000, num_valid: int = 200,
                 num_test: int = 300, levels: Sequence[int] = (1, 2, 3),
                 wrong_answer_rate: float = 0.2, calculation_rate: float = 0.3,
                 search_rate: float = 0.3, max_steps: int = 12,
                 templates: ReActTemplates | None = None):
        levels = tuple(levels)
        if not levels or any(level not in (1, 2, 3) for level in levels):
            raise ValueError(f"levels must be a non-empty subset of (1, 2, 3); got {levels}")
        for name, value in (("num_train", num_train), ("num_valid", num_valid),
                            ("num_test", num_test)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0; got {value!r}")
        for name, value in (("wrong_answer_rate", wrong_answer_rate),
                            ("calculation_rate", calculation_rate), ("search_rate", search_rate)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value}")
        self.seed, self.levels = seed, levels
        self.sizes = {"train": num_train, "valid": num_valid, "test": num_test}
        self.wrong_answer_rate, self.calculation_rate = wrong_answer_rate, calculation_rate
        self.search_rate, self.max_steps = search_rate, max_steps
        self.templates = templates if templates is not None else ReActTemplates.default()
        self._cache: dict[tuple[str, str], Any] = {}

    def _cached(self, kind: str, split: str, build):
        self._check(split)
        if (kind, split) not in self._cache:
            self._cache[kind, split] = build()
        return self._cache[kind, split]

    def _check(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")

    def world(self, split: str) -> KnowledgeBase:
        return self._cached("world", split, lambda: build_world(
            self.seed, split, max(20, self.sizes[split] // 3)))

    def split(self, split: str) -> list[Question]:
        return list(self._cached("questions", split, lambda: tuple(make_questions(
            self.world(split), split, self.sizes[split], self.seed, self.levels,
            self.calculation_rate))))

    def tools(self, split: str) -> dict[str, Tool]:
        return kb_tools(self.world(split))

    def workflow(self, split: str) -> ReActWorkflow:
        return ReActWorkflow(self.tools(split), templates=self.templates, max_steps=self.max_steps)

    def gold_scripts(self, split: str) -> list[list[GoldTurn]]:
        rng = random.Random(f"lragent-kb:{self.seed}:{split}:gold")
        kb = self.world(split)
        scripts = []
        for q in self.split(split):
            wrong_first = rng.random() < self.wrong_answer_rate
            scripts.append(gold_script(kb, q, self.templates, rng, wrong_first=wrong_first,
                                       search_rate=self.search_rate))
        return scripts

    def _gold(self, split: str) -> tuple[EpisodeRecord, ...]:
        questions, scripts = self.split(split), self.gold_scripts(split)
        cursors = [0] * len(scripts)

        def respond(request: TurnRequest, _: tuple[Segment, ...]) -> str:
            script, i = scripts[request.episode], cursors[request.episode]
            if i >= len(script):
                raise RuntimeError(f"gold script of {questions[request.episode].id} ran out")
            agent, text, expect = script[i]
            if agent != request.agent or (expect is not None and expect not in request.append):
                raise RuntimeError(f"gold script of {questions[request.episode].id}, turn {i}: "
                                   f"expected {agent!r} after text holding {expect!r}; got "
                                   f"{request.agent!r} after {request.append!r}")
            cursors[request.episode] += 1
            return text

        records = run_episodes(self.workflow(split), questions, ScriptedPolicy(respond))
        for q, record, script, cursor in zip(questions, records, scripts, cursors):
            if not record.finished or record.answer != q.answer or cursor != len(script):
                raise RuntimeError(f"gold episode {q.id} did not replay: finished={record.finished}"
                                   f", answer={record.answer!r} (gold {q.answer!r})")
        return tuple(records)

    def gold_episodes(self, split: str) -> list[EpisodeRecord]:
        return list(self._cached("gold", split, lambda: self._gold(split)))

    def role_samples(self, split: str) -> dict[str, list[dict[str, Any]]]:
        return group_by_role(self.gold_episodes(split), ROLES)

    def write_role_files(self, directory: str | os.PathLike, split: str = "train") -> dict[str, Path]:
        """Writes ``{plan,action,reflect}.json`` (published format plus role/segments/writers)."""
        return write_role_files(directory, self.role_samples(split))
