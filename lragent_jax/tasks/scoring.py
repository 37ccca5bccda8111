"""Exact-match scoring of episodes and aggregation into accuracy with a standard error.

Episodes are read through their ``answer``, ``finished``, ``malformed`` and ``steps`` attributes
(an ``EpisodeRecord``, or anything shaped like one); the gold answer, level and id come from the
record's ``task`` when it has them (a ``Question``), or are passed explicitly.
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

STATUSES = ("correct", "wrong", "unfinished")

_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
_EDGE = "\"'`“”‘’()[]{}<>*"
_TRAILING = ".,;:!?"


def normalize_answer(text: str | None) -> str:
    """Lower case, single spaces, no surrounding quotes/brackets or trailing punctuation, numbers in
    one form ("1,200" / "1200.0" / "+1200" -> "1200", "0.50" -> "0.5")."""
    if text is None:
        return ""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = " ".join(text.split())
    previous = None
    while text != previous:
        previous = text
        text = text.strip().rstrip(_TRAILING).strip(_EDGE).strip()
    return " ".join(_normalize_number(token) for token in text.split(" ")) if text else ""


def _normalize_number(token: str) -> str:
    if not _NUMBER.fullmatch(token):
        return token
    try:
        value = Decimal(token.replace(",", ""))
    except InvalidOperation:
        return token
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def exact_match(prediction: str | None, gold: str) -> bool:
    """True when both normalise to the same non-empty string."""
    if prediction is None:
        return False
    normalized = normalize_answer(prediction)
    return bool(normalized) and normalized == normalize_answer(gold)


@dataclasses.dataclass(frozen=True)
class EpisodeOutcome:
    """``status``: "correct", "wrong" (finished with another answer) or "unfinished"."""

    id: Any
    level: int | None
    status: str
    prediction: str | None
    gold: str
    malformed: int = 0
    steps: int = 0

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}; got {self.status!r}")

    @property
    def correct(self) -> bool:
        return self.status == "correct"


def score_episode(record: Any, gold: str | None = None, *, level: int | None = None,
                  id: Any = None) -> EpisodeOutcome:
    """The outcome of one episode. ``gold``/``level``/``id`` default to ``record.task.answer`` /
    ``.level`` / ``.id`` (id falls back to ``record.episode``)."""
    task = getattr(record, "task", None)
    if gold is None:
        gold = getattr(task, "answer", None)
    if not isinstance(gold, str):
        raise ValueError(f"no gold answer for episode {getattr(record, 'episode', '?')}: pass gold= "
                         "or give the record a task with a string 'answer'")
    level = level if level is not None else getattr(task, "level", None)
    if id is None:
        id = getattr(task, "id", getattr(record, "episode", None))
    answer = getattr(record, "answer", None)
    if not getattr(record, "finished", False) or answer is None:
        status = "unfinished"
    else:
        status = "correct" if exact_match(answer, gold) else "wrong"
    return EpisodeOutcome(id=id, level=level, status=status, prediction=answer, gold=gold,
                          malformed=int(getattr(record, "malformed", 0)),
                          steps=int(getattr(record, "steps", 0)))


def score_episodes(records: Sequence[Any],
                   golds: Sequence[str] | None = None) -> list[EpisodeOutcome]:
    if golds is not None and len(golds) != len(records):
        raise ValueError(f"{len(records)} records but {len(golds)} gold answers")
    return [score_episode(r, None if golds is None else golds[i]) for i, r in enumerate(records)]


@dataclasses.dataclass(frozen=True)
class Summary:
    """Accuracy over episodes, its standard error, and failure shares.

    ``stderr`` is clustered by question id: repeated runs of one question (the paper runs each 20
    times) are not independent samples. With one run per question it is the usual
    sqrt(p(1-p)/(n-1)). NaN below two questions.
    """

    n: int
    questions: int
    correct: int
    wrong: int
    unfinished: int
    accuracy: float
    stderr: float
    unfinished_share: float
    malformed_per_episode: float
    malformed_share: float  # episodes with at least one malformed action
    per_level: dict[int, Summary] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["per_level"] = {level: s.to_dict() for level, s in self.per_level.items()}
        return data


def aggregate(outcomes: Sequence[EpisodeOutcome], *, by_level: bool = True) -> Summary:
    n = len(outcomes)
    counts = {status: sum(o.status == status for o in outcomes) for status in STATUSES}
    accuracy = counts["correct"] / n if n else math.nan
    clusters: dict[Any, list[float]] = {}
    for o in outcomes:
        clusters.setdefault(o.id, []).append(float(o.correct))
    g = len(clusters)
    if g >= 2:
        # cluster-robust variance of the mean, with the G/(G-1) small-sample factor
        sum_sq = sum((sum(ys) - len(ys) * accuracy) ** 2 for ys in clusters.values())
        stderr = math.sqrt(sum_sq * g / (g - 1)) / n
    else:
        stderr = math.nan
    per_level = {}
    if by_level:
        levels = sorted({o.level for o in outcomes if o.level is not None})
        per_level = {level: aggregate([o for o in outcomes if o.level == level], by_level=False)
                     for level in levels}
    return Summary(
        n=n, questions=g, correct=counts["correct"], wrong=counts["wrong"],
        unfinished=counts["unfinished"], accuracy=accuracy, stderr=stderr,
        unfinished_share=counts["unfinished"] / n if n else math.nan,
        malformed_per_episode=sum(o.malformed for o in outcomes) / n if n else math.nan,
        malformed_share=sum(o.malformed > 0 for o in outcomes) / n if n else math.nan,
        per_level=per_level)
