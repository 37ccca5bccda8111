"""The multi-agent driver: turn order, append-only segmented text, ReAct protocol, batching."""

import subprocess
import sys

import pytest

from lragent_jax.workflow import (ENV, EpisodeRecord, ReActTemplates, ReActWorkflow,
                                  RoundRobinWorkflow, ScriptedPolicy, Segment, TurnOutput,
                                  TurnSpec, clean_output, per_role_samples, run_episodes)

FACTS = {"ada": "Ada lives in Paris.", "paris": "Paris is in France."}


def toy_tools():
    def search(query):
        return FACTS.get(query.lower(), f"No entry for {query}.")

    def explode(_):
        raise RuntimeError("tool broke")

    return {"Search": (search, "Search[name], which returns one fact."),
            "Explode": (explode, "Explode[x], which always fails.")}


def check_segments(record: EpisodeRecord):
    assert record.text == "".join(s.text for s in record.segments)
    for sample in per_role_samples(record):
        assert "".join(sample["segments"]) == sample["input"]
        assert len(sample["writers"]) == len(sample["segments"])
    # every role sample's input is exactly the text before that role's output
    position = 0
    role_turns = iter(per_role_samples(record))
    for segment in record.segments:
        if segment.writer != ENV:
            sample = next(role_turns)
            assert sample["input"] == record.text[:position]
            assert sample["output"] == segment.text
            assert sample["role"] == segment.writer
        position += len(segment.text)


def test_react_text_matches_protocol():
    script = [("plan", "I should search Ada."), ("plan", "Search"), ("action", "Ada"),
              ("plan", "Ada lives in Paris."), ("plan", "Finish"), ("action", "Paris"),
              ("reflect", "Paris follows from the observation."), ("reflect", "Reflect[right]")]
    workflow = ReActWorkflow(toy_tools())
    [record] = run_episodes(workflow, ["Where does Ada live?"],
                            ScriptedPolicy.from_outputs({0: script}))
    expected = (workflow.instruction + "\nQuestion: Where does Ada live?\n"
                "Thought: \n### Response:\nI should search Ada."
                "\nAction: \n### Response:\nSearch"
                "\nAction: Search[\n### Response:\nAda"
                "]\nObservation: Ada lives in Paris.\n"
                "Thought: \n### Response:\nAda lives in Paris."
                "\nAction: \n### Response:\nFinish"
                "\nAction: Finish[\n### Response:\nParis"
                "]\nObservation: Please reflect your answer.\n"
                "Thought: \n### Response:\nParis follows from the observation."
                "\nAction: \n### Response:\nReflect[right]")
    assert record.text == expected
    assert (record.answer, record.finished, record.steps, record.malformed) == ("Paris", True, 3, 0)
    assert "(1) Search[name]" in workflow.instruction and "(3) Finish[answer]" in workflow.instruction
    assert [s.writer for s in record.segments[:2]] == [ENV, ENV]
    check_segments(record)


def test_trajectory_seen_by_policy_is_append_only():
    seen = []

    def respond(request, trajectory):
        seen.append("".join(s.text for s in trajectory))
        return {"plan": "Search" if len(seen) % 3 == 2 else "think", "action": "Ada"}.get(
            request.agent, "x")

    [record] = run_episodes(ReActWorkflow(toy_tools(), max_steps=3), ["q"], ScriptedPolicy(respond))
    samples = per_role_samples(record)
    assert seen == [s["input"] for s in samples]
    for earlier, later in zip(seen, seen[1:]):
        assert later.startswith(earlier)
    assert record.text.startswith(seen[-1])


def test_reflect_wrong_then_retry():
    script = ["t", "Finish", "Rome", "check", "Reflect[wrong]",
              "t2", "Search", "Ada", "t3", "Finish[Paris]", "ok", "Reflect", "right"]
    [record] = run_episodes(ReActWorkflow(toy_tools()), ["q"], ScriptedPolicy.from_outputs({0: script}))
    assert record.finished and record.answer == "Paris" and record.malformed == 0
    assert "\nObservation: The answer may be wrong, please try to solve the question again.\n" \
        in record.text
    # Finish[...] written inline needs no argument turn; a bare Reflect gets one, by reflect
    assert "### Response:\nFinish[Paris]\nObservation: Please reflect" in record.text
    assert [t.agent for t in record.turns][-3:] == ["reflect", "reflect", "reflect"]
    assert record.text.endswith("\nAction: Reflect[\n### Response:\nright]")
    check_segments(record)


@pytest.mark.parametrize("bad, message", [
    (["Fly", ], "Invalid action. The action must be one of: Search, Explode, Finish, Reflect."),
    (["Reflect"], "Invalid action. Reflect only follows the Finish action."),
    (["Reflect[right]"], "Invalid action. Reflect only follows the Finish action."),
    (["Search", "  "], "Invalid action. Search needs an argument."),
    (["Finish[]"], "Invalid action. Finish needs an argument."),
])
def test_malformed_actions_are_observed_and_counted(bad, message):
    script = ["think"] + bad + ["think", "Finish", "Paris", "judge", "Reflect[right]"]
    [record] = run_episodes(ReActWorkflow(toy_tools()), ["q"], ScriptedPolicy.from_outputs({0: script}))
    assert f"Observation: {message}\n" in record.text
    assert record.malformed == 1 and record.finished and record.answer == "Paris"
    check_segments(record)


def test_reflect_phase_rejects_other_actions():
    script = ["t", "Finish", "Paris", "judge", "Search[Ada]", "judge", "Search", "judge",
              "Reflect[maybe]", "judge", "Reflect[right]"]
    [record] = run_episodes(ReActWorkflow(toy_tools()), ["q"], ScriptedPolicy.from_outputs({0: script}))
    assert "After Finish the action must be Reflect[right] or Reflect[wrong]" in record.text
    assert "Reflect takes right or wrong" in record.text
    assert record.malformed == 3 and record.answer == "Paris"
    assert {t.agent for t in record.turns[3:]} == {"reflect"}


def test_tool_errors_become_observations():
    script = ["t", "Explode", "now", "t", "Finish", "x", "j", "Reflect[right]"]
    [record] = run_episodes(ReActWorkflow(toy_tools()), ["q"], ScriptedPolicy.from_outputs({0: script}))
    assert "Observation: Error: RuntimeError: tool broke\n" in record.text
    assert record.malformed == 0 and record.finished


def test_max_steps_leaves_episode_unfinished():
    policy = ScriptedPolicy(lambda r, _: {"plan": "Search", "action": "Ada"}[r.agent]
                            if "Action" in r.append else "keep looking")
    [record] = run_episodes(ReActWorkflow(toy_tools(), max_steps=4), ["q"], policy)
    assert not record.finished and record.answer is None and record.steps == 4
    assert record.text.endswith("]\nObservation: Ada lives in Paris.\n")  # the unread last observation
    assert record.segments[-1].writer == ENV
    check_segments(record)


def test_two_role_react_without_reflect():
    workflow = ReActWorkflow(toy_tools(), plan="solver", action="solver", reflect=None)
    assert workflow.roles == ("solver",)
    assert "Reflect" not in workflow.instruction
    script = ["t", "Reflect[right]", "t", "Finish", "Paris"]
    [record] = run_episodes(workflow, ["q"], ScriptedPolicy.from_outputs({0: script}))
    assert record.finished and record.answer == "Paris" and record.malformed == 1
    assert record.text.endswith("Finish[\n### Response:\nParis]")  # closing bracket as trailing env
    assert {s.writer for s in record.segments} == {ENV, "solver"}


def test_round_robin_custom_order():
    workflow = RoundRobinWorkflow(["critic", "writer", "critic"], rounds=2,
                                  templates={"critic": "\n[{round}] {role}: ",
                                             "writer": "\n[{round}] {role}: "})
    policy = ScriptedPolicy(lambda r, t: f"{r.agent}-{len(t)}")
    [record] = run_episodes(workflow, ["Write a haiku."], policy)
    assert [t.agent for t in record.turns] == ["critic", "writer", "critic"] * 2
    assert record.text.startswith("Write a haiku.\n\n[1] critic: critic-2\n[1] writer: writer-4")
    assert record.answer == record.turns[-1].output and record.finished
    assert [s["role"] for s in per_role_samples(record)] == [t.agent for t in record.turns]
    check_segments(record)


def test_batched_steps_mix_agents_and_hooks():
    class Recording(ScriptedPolicy):
        def __init__(self, respond):
            super().__init__(respond)
            self.started, self.ended = [], []

        def start_episode(self, episode, prompt_segments):
            super().start_episode(episode, prompt_segments)
            self.started.append((episode, tuple(prompt_segments)))

        def end_episode(self, episode):
            super().end_episode(episode)
            self.ended.append(episode)

    done = ["t", "Finish", "Paris", "j", "Reflect[right]"]
    scripts = {10: done, 11: ["t", "Search[Ada]"] + done, 12: ["t", "Search", "Ada"] + done}
    policy = Recording(ScriptedPolicy.from_outputs(scripts)._respond)
    progress = []
    records = run_episodes(ReActWorkflow(toy_tools()), ["a", "b", "c"], policy, first_episode=10,
                           progress=lambda d, n: progress.append((d, n)))
    assert [r.episode for r in records] == [10, 11, 12] and all(r.answer == "Paris" for r in records)
    assert [e for e, _ in policy.started] == [10, 11, 12]
    assert all(p[1].text == "\nQuestion: a\n" for e, p in policy.started if e == 10)
    assert sorted(policy.ended) == [10, 11, 12] and policy.ended[0] == 10
    assert len(policy.batches) == len(scripts[12])  # one call per step
    for batch in policy.batches:
        assert len({e for e, _ in batch}) == len(batch)  # at most one request per episode
    assert any(len({a for _, a in batch}) > 1 for batch in policy.batches)
    assert [len(b) for b in policy.batches] == [3] * 5 + [2] * 2 + [1]
    assert progress[-1] == (3, 3)


def test_policy_contract_is_checked():
    class Short:
        def turns(self, requests):
            return []

    class Raw:
        def turns(self, requests):
            return ["text" for _ in requests]

    with pytest.raises(ValueError, match="returned 0 outputs for 1"):
        run_episodes(ReActWorkflow(toy_tools()), ["q"], Short())
    with pytest.raises(ValueError, match="TurnOutput"):
        run_episodes(ReActWorkflow(toy_tools()), ["q"], Raw())
    with pytest.raises(ValueError, match="no scripted output left for episode 0"):
        run_episodes(ReActWorkflow(toy_tools()), ["q"], ScriptedPolicy.from_outputs({0: ["t"]}))
    with pytest.raises(ValueError, match="script is for 'action'"):
        run_episodes(ReActWorkflow(toy_tools()), ["q"],
                     ScriptedPolicy.from_outputs({0: [("action", "t")]}))
    with pytest.raises(ValueError, match="stop_reason"):
        TurnOutput("x", "done")
    with pytest.raises(ValueError, match="clashes"):
        ReActWorkflow({"finish": (str, "d")})
    with pytest.raises(ValueError, match="agent"):
        TurnSpec(ENV)


def test_clean_output_and_stops():
    assert clean_output("  Lookup \n Thought: x", ("\n",)) == "Lookup"
    assert clean_output("Ada]\nObservation", ("]", "\n")) == "Ada"
    assert clean_output(" plain ") == "plain"
    # a policy that ignores stop strings still yields the same trajectory as one that honours them
    script = ["I think.\nAction: Search[Ada]", "Search\nmore", "Ada] trailing", "t", "Finish",
              "Paris", "j", "Reflect[right]"]
    [record] = run_episodes(ReActWorkflow(toy_tools()), ["q"], ScriptedPolicy.from_outputs({0: script}))
    assert record.turns[0].output == "I think." and record.turns[0].stop_reason == "stop"
    assert record.turns[2].raw_output == "Ada] trailing" and record.answer == "Paris"


def test_scienceqa_markers():
    templates = ReActTemplates.scienceqa()
    script = ["t", "Search", "Ada", "t", "Finish", "A", "j", "Reflect[wrong]", "t", "Search", "Ada"]
    [record] = run_episodes(ReActWorkflow(toy_tools(), templates=templates, max_steps=4), ["q"],
                            ScriptedPolicy.from_outputs({0: script}))
    assert "\nQuestion:q\nThought: \n### Response:\n" in record.text
    assert "\nAciton: Search[\n### Response:\nAda]\nObversation: Ada lives in Paris.\n" in record.text
    assert "Obversation: The answer maybe wrong, please try to solve the question again." in record.text
    verbatim = ReActTemplates.scienceqa(instruction="Given instruction.")
    assert ReActWorkflow(toy_tools(), templates=verbatim).instruction == "Given instruction."


def test_segment_validation():
    with pytest.raises(ValueError):
        Segment("", "x")
    with pytest.raises(ValueError, match="must contain"):
        ReActTemplates.default().__class__(instruction="", finish_description="",
                                           reflect_description="", observation="no placeholder")


def test_host_modules_do_not_import_jax():
    code = ("import sys, lragent_jax\n"
            "if 'jax' in sys.modules: print('package-imports-jax'); raise SystemExit\n"
            "import lragent_jax.workflow, lragent_jax.tasks, lragent_jax.tasks.kb, "
            "lragent_jax.tasks.scoring\n"
            "print('jax' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    if out.stdout.strip() == "package-imports-jax":
        pytest.skip("lragent_jax/__init__.py imports jax itself")
    assert out.stdout.strip() == "False"
