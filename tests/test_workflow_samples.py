"""The role-sample format has one owner (``lragent_jax.workflow.samples``): episodes give samples,
role files hold them, and every reader (training data, ScienceQA, eval) goes through it."""

from __future__ import annotations

import json

import pytest

from lragent_jax.workflow import ENV, EpisodeRecord, Segment
from lragent_jax.workflow import samples as fmt


def _record() -> EpisodeRecord:
    segments = (Segment(ENV, "Q: 2+2?\n"), Segment(ENV, "Thought: "), Segment("plan", "add"),
                Segment(ENV, "\nAction: "), Segment("action", "Finish[4]"),
                Segment(ENV, "\nReflect: "), Segment("reflect", "right"))
    return EpisodeRecord(episode=0, task="2+2", segments=segments, turns=(), answer="4",
                         finished=True, steps=1, malformed=0)


def test_per_role_samples_round_trip_through_role_files(tmp_path):
    samples = fmt.group_by_role([_record()], ("plan", "action", "reflect"))
    assert [len(v) for v in samples.values()] == [1, 1, 1]
    action = samples["action"][0]
    assert action["input"] == "Q: 2+2?\nThought: add\nAction: " and action["output"] == "Finish[4]"
    assert action["writers"] == [ENV, ENV, "plan", ENV] and "".join(action["segments"]) == \
        action["input"]
    paths = fmt.write_role_files(tmp_path, samples)
    assert sorted(p.name for p in paths.values()) == ["action.json", "plan.json", "reflect.json"]
    assert fmt.load_role_files(tmp_path, ("plan", "action", "reflect")) == samples


def test_segment_processors_give_env_text_to_the_next_writer():
    sample = fmt.per_role_samples(_record())[2]  # reflect's turn
    assert fmt.segment_processors(sample["writers"], "reflect") == \
        ["plan", "plan", "plan", "action", "action", "reflect"]
    assert fmt.writer_problem(sample, ("plan", "action", "reflect")) is None
    assert "not agents" in fmt.writer_problem(sample, ("plan", "reflect"))
    assert "records no writers" in fmt.writer_problem({"input": "x", "output": "y"}, ("plan",))


@pytest.mark.parametrize("record, problem", [
    ({"input": "ab", "output": "c", "segments": ["a", "b"], "writers": [ENV]}, "differ in length"),
    ({"input": "ab", "output": "c", "segments": ["a", "c"]}, "do not join"),
    ({"input": 3, "output": "c"}, "'input' must be a string"),
    (["input"], "expected an object"),
])
def test_sample_problem_names_what_is_wrong(record, problem, tmp_path):
    assert problem in fmt.sample_problem(record)
    (tmp_path / "plan.json").write_text(json.dumps([record]))
    with pytest.raises(ValueError, match=rf"plan\.json: record 0: .*{problem}"):
        fmt.load_role_files(tmp_path, ("plan",))


def test_the_validation_split_has_one_home():
    from train import data

    assert data.split_validation is fmt.split_validation
    assert data.writer_problem is fmt.writer_problem
    samples = {"plan": [{"input": str(i), "output": "o"} for i in range(40)]}
    train, valid = fmt.split_validation(samples, 0.25, seed=1)
    assert len(valid["plan"]) == 10 and len(train["plan"]) == 30
    assert sorted(s["input"] for s in train["plan"] + valid["plan"]) == \
        sorted(s["input"] for s in samples["plan"])
