"""Exact-match scoring and aggregation."""

import math
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lragent_jax.tasks.kb import Question
from lragent_jax.tasks.scoring import (EpisodeOutcome, aggregate, exact_match, normalize_answer,
                                       score_episode, score_episodes)
from lragent_jax.workflow import EpisodeRecord


@pytest.mark.parametrize("prediction, gold", [
    ("1,200", "1200"), ("1200.0", "1200"), ("+1200", "1200"), ("0.50", "0.5"), ("Telmora.", "telmora"),
    ("  Mara   Tilden ", "Mara Tilden"), ("(A)", "A"), ('"Brivex"!', "Brivex"), ("2,922,900", "2922900"),
    ("1,200 people", "1200 people"),
])
def test_exact_match_normalises(prediction, gold):
    assert exact_match(prediction, gold)


@pytest.mark.parametrize("prediction, gold", [
    ("1201", "1200"), ("Telmora City", "Telmora"), (None, "x"), ("", ""), ("12,00", "1200"),
])
def test_exact_match_rejects(prediction, gold):
    assert not exact_match(prediction, gold)


@given(st.integers(min_value=-10**12, max_value=10**12))
def test_thousands_separators(n):
    assert exact_match(f"{n:,}", str(n)) and exact_match(f"{n}.", f"{n:,}")


@given(st.text(max_size=30))
def test_normalize_is_idempotent(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once


def record(answer, finished, malformed=0, *, level=1, id="q0", gold="Paris"):
    task = Question(id=id, question="?", answer=gold, level=level, start="x", path=("city",) * level)
    return EpisodeRecord(episode=0, task=task, segments=(), turns=(), answer=answer,
                         finished=finished, steps=3, malformed=malformed)


def test_episode_outcomes():
    assert score_episode(record("paris.", True)).status == "correct"
    assert score_episode(record("Rome", True)).status == "wrong"
    unfinished = score_episode(record(None, False, malformed=2))
    assert unfinished.status == "unfinished" and unfinished.malformed == 2 and not unfinished.correct
    assert score_episode(record("Paris", False)).status == "unfinished"
    plain = SimpleNamespace(answer="42", finished=True, episode=5)
    outcome = score_episode(plain, "42.0", level=2)
    assert (outcome.status, outcome.id, outcome.level) == ("correct", 5, 2)
    with pytest.raises(ValueError, match="no gold answer"):
        score_episode(plain)
    with pytest.raises(ValueError, match="2 records but 1 gold"):
        score_episodes([plain, plain], ["1"])


def test_aggregate():
    records = [record("Paris", True, id="a"), record("Rome", True, 1, id="b"),
               record(None, False, 3, level=2, id="c"), record("Paris", True, level=2, id="d")]
    summary = aggregate(score_episodes(records))
    assert (summary.n, summary.correct, summary.wrong, summary.unfinished) == (4, 2, 1, 1)
    assert summary.accuracy == 0.5 and summary.unfinished_share == 0.25
    assert summary.malformed_per_episode == 1.0 and summary.malformed_share == 0.5
    assert summary.stderr == pytest.approx(math.sqrt(0.25 / 3))
    assert set(summary.per_level) == {1, 2}
    assert summary.per_level[2].accuracy == 0.5 and summary.per_level[2].unfinished == 1
    assert summary.to_dict()["per_level"][1]["n"] == 2


def test_repeated_runs_cluster_the_standard_error():
    # two questions, each run 3 times: one always right, one always wrong -> 2 independent samples
    outcomes = [EpisodeOutcome(id=q, level=1, status=s, prediction="x", gold="x")
                for q, s in [("a", "correct"), ("b", "wrong")] for _ in range(3)]
    summary = aggregate(outcomes)
    assert summary.accuracy == 0.5 and summary.questions == 2
    assert summary.stderr == pytest.approx(0.5)  # not sqrt(0.25 / 5) as if 6 independent runs
    assert math.isnan(aggregate(outcomes[:3]).stderr)
    assert math.isnan(aggregate([]).accuracy)
