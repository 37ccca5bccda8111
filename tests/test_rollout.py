"""The continuous-batching rollout engine: same tokens as each episode alone whatever the rows and
arrival order, rows reused cleanly, faults kept to their episode, memory-budgeted row counts."""

from __future__ import annotations

import dataclasses
import io
import random

import jax
import jax.numpy as jnp
import pytest

from lragent_jax.agents import run_model_episodes
from lragent_jax.cache import ALL_MODES
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.lora import init_adapters
from lragent_jax.model import init_params
from lragent_jax.rollout import (PendingTurn, ProgressBar, RolloutEngine, Schedule, TurnBatcher,
                                 activation_bytes_per_row, episode_seed, plan_rows, run_traces,
                                 run_workflow)
from lragent_jax.session import GenerationSettings, Session, Turn
from lragent_jax.tokenizer import ByteTokenizer
from lragent_jax.workflow import (ENV, EpisodeResult, ReActTemplates, ReActWorkflow,
                                  ScriptedPolicy, Segment, TurnSpec, Workflow, run_episodes)

TOK = ByteTokenizer()
ROLES = ("plan", "action", "reflect")


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.tiny(vocab_size=ByteTokenizer.vocab_size,
                           eos_token_ids=ByteTokenizer.eos_token_ids, hidden_size=64,
                           intermediate_size=128)
    params = init_params(jax.random.key(0), cfg)
    lora = LoraConfig(rank=4, targets=("q", "v", "o", "down"), agents=ROLES)
    adapters = init_adapters(jax.random.key(1), cfg, lora, b_scale=0.3)
    return cfg, params, lora, adapters


def _session(model, mode, rows, capacity=256, tokenizer=TOK, config=None):
    cfg, params, lora, adapters = model
    # one chunk bucket (64) for nearly every turn here: few compilations
    return Session(config or cfg, params, tokenizer, adapters=adapters, lora=lora, mode=mode,
                   batch=rows, capacity=capacity, cache_dtype=jnp.float32, prefill_chunk=64,
                   min_chunk_bucket=64, min_new_bucket=16)


class TalkWorkflow(Workflow):
    """Roles take turns on a task ``{"q", "turns", "new", "offset", "raise_at"}``: ``turns`` turns
    of at most ``new`` tokens each, starting at role ``offset``; the "tool" run on the output of
    turn ``raise_at`` raises."""

    roles = ROLES

    def start(self, task):
        return {"task": task, "turn": 0, "outputs": []}

    def prompt(self, state):
        return (Segment(ENV, f"Task: {state['task']['q']}\n"),)

    def next_turn(self, state):
        task = state["task"]
        if state["turn"] >= task["turns"]:
            return None
        role = ROLES[(state["turn"] + task.get("offset", 0)) % len(ROLES)]
        return TurnSpec(role, f"\n{role}:", task["new"], ("\n",))

    def on_output(self, state, text):
        state["turn"] += 1
        if state["turn"] == state["task"].get("raise_at"):
            raise RuntimeError(f"tool failed on {text!r}")
        state["outputs"].append(text)

    def result(self, state):
        return EpisodeResult(answer=state["outputs"][-1] if state["outputs"] else None,
                             finished=True, steps=state["turn"])


TASKS = [{"q": "alpha", "turns": 4, "new": 6, "offset": 0},
         {"q": "a longer question here", "turns": 2, "new": 9, "offset": 1},
         {"q": "third one?", "turns": 6, "new": 3, "offset": 2},
         {"q": "four", "turns": 3, "new": 5, "offset": 1},
         {"q": "five is short", "turns": 5, "new": 4, "offset": 0}]


def _alone(model, mode, task, workflow=None):
    """The reference: one episode on a fresh one-row session, through run_model_episodes."""
    session = _session(model, mode, 1)
    record = run_model_episodes(workflow or TalkWorkflow(), [task], session)[0]
    return record, session.prefill_counts()


def _same_episode(a, b):
    return dataclasses.replace(a, episode=0) == dataclasses.replace(b, episode=0)


@pytest.mark.parametrize("mode", ["base_lowrank_shared", "non_shared"])
def test_engine_equals_each_episode_alone_whatever_rows_and_order(model, mode):
    alone = [_alone(model, mode, task) for task in TASKS]
    order = list(range(len(TASKS)))
    random.Random(0).shuffle(order)
    for rows, arrival in ((1, list(range(len(TASKS)))), (2, order), (3, order[::-1])):
        session = _session(model, mode, rows)
        engine = RolloutEngine(session, record_calls=True)
        results = list(run_workflow(TalkWorkflow(), [TASKS[i] for i in arrival], session,
                                    engine=engine))
        assert [r.index for r in results] == list(range(len(TASKS)))  # stream order
        for result, task_id in zip(results, arrival):
            record, prefilled = alone[task_id]
            assert result.ok, result.error
            assert result.task is TASKS[task_id]
            assert _same_episode(result.record, record), (rows, task_id)
            assert result.prefilled == prefilled, (rows, task_id)
            assert result.calls == len(result.ttft_s) == len(record.turns)
        assert engine.batcher.free_rows == rows  # every row given back at the end
        # while tasks remain, every call ran on every row
        assert all(c.rows == rows for c in engine.batcher.calls[:3])
        if rows > 1:
            # one call ran rows at different agents' turns
            assert any(len(set(c.agents)) > 1 for c in engine.batcher.calls)


@pytest.mark.parametrize("mode", ["fully_shared", "base_shared"])
def test_react_workflow_runs_as_run_model_episodes(model, mode):
    """The paper's plan / action / reflect loop in the two modes the test above leaves out."""
    templates = ReActTemplates(instruction="Answer.", finish_description="",
                               reflect_description="")  # a short prompt: few compiled shapes
    workflow = ReActWorkflow({"Lookup": (lambda q: f"facts about {q}", "Lookup[topic]")},
                             templates=templates, max_steps=2, thought_tokens=12, action_tokens=4,
                             argument_tokens=6)
    questions = ["Who?", "Where is it?", "When did it happen?"]
    expect = run_model_episodes(workflow, questions, _session(model, mode, 1))
    got = list(run_workflow(workflow, questions, _session(model, mode, 2)))
    assert all(r.ok for r in got)
    assert [r.record for r in got] == expect


def test_freed_row_is_reused_with_no_leftover_state(model):
    # a long episode first, then short ones on the same row: each equals its fresh run
    tasks = [{"q": "a long first episode " * 3, "turns": 6, "new": 9, "offset": 0},
             {"q": "x", "turns": 1, "new": 3, "offset": 1},
             {"q": "y?", "turns": 2, "new": 4, "offset": 2}]
    for mode in ("non_shared", "base_lowrank_shared"):
        session = _session(model, mode, 1)
        results = list(run_workflow(TalkWorkflow(), tasks, session))
        assert {r.row for r in results} == {0}
        for result, task in zip(results, tasks):
            record, prefilled = _alone(model, mode, task)
            assert _same_episode(result.record, record)
            assert result.prefilled == prefilled  # counts restart at zero on a reused row
    # two rows: task 1 (2 turns) ends first and task 2 starts on its row while task 0 (4 turns)
    # still runs on the other
    session = _session(model, "base_lowrank_shared", 2)
    engine = RolloutEngine(session, record_calls=True)
    by_index = {r.index: r for r in run_workflow(TalkWorkflow(), TASKS, session, engine=engine)}
    assert by_index[2].row == by_index[1].row != by_index[0].row
    assert by_index[1].finished_s <= by_index[2].started_s < by_index[0].finished_s
    assert all(c.rows == 2 for c in engine.batcher.calls[:4])  # no call ran a row short


def test_results_in_task_order_or_as_they_finish(model):
    session = _session(model, "base_lowrank_shared", 3)
    done_order = list(run_workflow(TalkWorkflow(), TASKS, session, ordered=False))
    assert sorted(r.index for r in done_order) == list(range(len(TASKS)))
    finished = [r.finished_s for r in done_order]
    assert finished == sorted(finished)
    assert [r.index for r in done_order] != list(range(len(TASKS)))  # short ones came first
    ordered = list(run_workflow(TalkWorkflow(), TASKS, session))
    assert [r.index for r in ordered] == list(range(len(TASKS)))
    by_index = {r.index: r.record for r in done_order}
    assert all(_same_episode(r.record, by_index[r.index]) for r in ordered)


def test_over_capacity_prompt_fails_alone_and_the_others_go_on(model):
    tasks = list(TASKS[:3])
    tasks.insert(1, {"q": "far too long " * 40, "turns": 2, "new": 4})
    session = _session(model, "base_lowrank_shared", 2)
    results = list(run_workflow(TalkWorkflow(), tasks, session))
    bad = results[1]
    assert not bad.ok and bad.error.startswith("CapacityError")
    assert "task 1" in bad.error and "more than the row capacity 256" in bad.error
    assert bad.calls == 0 and bad.prefilled_total == 0
    for result, task in zip([results[0]] + results[2:], [tasks[0]] + tasks[2:]):
        assert result.ok and _same_episode(result.record, _alone(model, "base_lowrank_shared",
                                                                 task)[0])


def test_raising_tool_ends_only_its_episode(model):
    tasks = [dict(TASKS[0]), dict(TASKS[2], raise_at=2), dict(TASKS[3])]
    session = _session(model, "base_lowrank_shared", 3)
    results = list(run_workflow(TalkWorkflow(), tasks, session))
    failed = results[1]
    assert not failed.ok and failed.error.startswith("RuntimeError: tool failed")
    # the record holds the episode up to the turn whose tool raised
    assert failed.record is not None and len(failed.record.turns) == 2
    assert isinstance(failed.exception, RuntimeError)
    for i in (0, 2):
        assert results[i].ok
        assert _same_episode(results[i].record, _alone(model, "base_lowrank_shared", tasks[i])[0])


def test_react_tool_errors_option():
    def broken(_):
        raise KeyError("index offline")

    script = {0: ["look it up", "Lookup[x]", "done", "Finish[1]"]}
    tools = {"Lookup": (broken, "Lookup[topic]")}
    observed = run_episodes(ReActWorkflow(tools, reflect=None), ["Q?"],
                            ScriptedPolicy.from_outputs(script))[0]
    assert "Error: KeyError" in observed.text and observed.answer == "1"
    with pytest.raises(KeyError, match="index offline"):
        run_episodes(ReActWorkflow(tools, reflect=None, tool_errors="raise"), ["Q?"],
                     ScriptedPolicy.from_outputs(script))
    with pytest.raises(ValueError, match="tool_errors must be 'observe' or 'raise'; got 'skip'"):
        ReActWorkflow(tools, tool_errors="skip")


def test_a_turn_the_session_refuses_fails_only_its_row(model):
    session = _session(model, "fully_shared", 3)
    batcher = TurnBatcher(session)
    rows = [batcher.acquire() for _ in range(3)]
    for row in rows:
        session.append_text(row, f"row {row} prompt\n")
    good = Turn("plan", append="Go:", settings=GenerationSettings(max_new_tokens=5))
    batcher.submit(rows[0], good)
    batcher.submit(rows[1], Turn("plan", append_ids=(999,)))  # outside the vocabulary
    batcher.submit(rows[2], Turn("action", append="x" * 300))  # over the capacity
    done = {d.row: d for d in batcher.step()}
    assert done[rows[0]].error is None and len(done[rows[0]].result.token_ids) >= 1
    assert "out of range for vocab size 259" in str(done[rows[1]].error)
    assert "exceeds the cache capacity 256" in str(done[rows[2]].error)
    assert [len(session.tokens[r]) for r in rows[1:]] == [len(f"row {r} prompt\n") for r in rows[1:]]
    alone = _session(model, "fully_shared", 1)
    alone.append_text(0, "row 0 prompt\n")
    assert alone.turn({0: good})[0].token_ids == done[rows[0]].result.token_ids
    with pytest.raises(ValueError, match="row 1 already has a pending turn"):
        batcher.submit(rows[1], good)
        batcher.submit(rows[1], good)
    batcher.release(rows[2])
    with pytest.raises(ValueError, match="row 2 is not busy"):
        batcher.submit(rows[2], good)
    with pytest.raises(RuntimeError, match="all 3 rows are busy"):
        batcher.acquire(), batcher.acquire()


def test_schedule_holds_long_prefills_back_until_they_fill_a_call():
    schedule = Schedule(long_prefill=100, long_fill=0.5, max_wait=2)
    turn = Turn("plan")

    def pending(row, chunk):
        return PendingTurn(row, turn, None, row, chunk=chunk)

    short = [pending(r, 10) for r in range(3)]
    long = [pending(3, 4000)]  # padded to 4096: 4000 of 8 x 4096 positions are real
    assert schedule.select(short + long, rows=8) == short
    assert schedule.select(long, rows=8) == long  # nothing else to do
    full = [pending(4 + r, 4000) for r in range(4)]  # 5 x 4000 + 30 >= 0.5 x 8 x 4096
    assert schedule.select(short + long + full, rows=8) == short + long + full
    # the longest padded length that fills: the 4096 turns wait, the 1024 ones go
    mid = [pending(10 + r, 1000) for r in range(5)]  # 5000 + 30 real of 8 x 1024 positions
    assert schedule.select(short + long + mid, rows=8) == short + mid
    long[0].waited = 2
    assert schedule.select(short + long, rows=8) == short + long  # waited long enough
    assert Schedule(long_prefill=None).select(short + long, rows=8) == short + long
    # with a long-prefill lane that takes up to 4 long turns, those join at once
    long[0].waited = 0
    assert schedule.select(short + long, rows=8, lane_rows=4) == short + long
    assert schedule.select(short + long + mid[:3], rows=8, lane_rows=4) == short + long + mid[:3]
    # five long turns: more than the lane takes, the fill rule again
    assert schedule.select(short + long + mid, rows=8, lane_rows=4) == short + mid
    with pytest.raises(ValueError, match="long_fill must be in"):
        Schedule(long_fill=2)


def test_progress_and_early_stop_give_rows_back(model):
    session = _session(model, "base_lowrank_shared", 2)
    seen = []
    engine = RolloutEngine(session, progress=seen.append)
    results = run_workflow(TalkWorkflow(), TASKS, session, engine=engine)
    first = next(results)
    assert first.index == 0
    results.close()  # the caller stops early
    assert engine.batcher.free_rows == 2 and engine.batcher.busy_rows == 0
    assert seen and seen[-1].total == len(TASKS)
    assert [p.calls for p in seen] == sorted(p.calls for p in seen)
    assert seen[-1].generated > 0 and seen[-1].done >= 1
    stream = io.StringIO()
    bar = ProgressBar(label="kb", stream=stream, every_s=0)
    list(run_workflow(TalkWorkflow(), TASKS[:2], session, progress=bar))
    assert "kb 2/2 episodes" in stream.getvalue() and "gen tok/s" in stream.getvalue()


def test_tasks_may_be_an_unbounded_stream(model):
    def stream():
        i = 0
        while True:
            yield dict(TASKS[i % len(TASKS)])
            i += 1

    session = _session(model, "base_lowrank_shared", 2)
    results = run_workflow(TalkWorkflow(), stream(), session)
    first = [next(results) for _ in range(7)]
    results.close()
    assert [r.index for r in first] == list(range(7))
    assert _same_episode(first[5].record, first[0].record)


def _trace(name, prompt, turns):
    from eval.traces import Trace, TraceTurn

    return Trace(name, prompt, tuple(TraceTurn(*t) for t in turns))


def test_trace_replay_generates_exact_counts_whatever_the_rows(model):
    cfg = model[0].replace(eos_token_ids=())
    from eval.common import NullTokenizer

    traces = [_trace("a", 40, [("plan", 5, 7), ("action", 3, 2), ("reflect", 20, 1)]),
              _trace("b", 20, [("action", 9, 4), ("plan", 2, 9)]),
              _trace("c", 60, [("reflect", 1, 3)] * 4)]
    outputs = None
    for rows in (1, 2):
        session = _session(model, "base_shared", rows, tokenizer=NullTokenizer(), config=cfg)
        results = list(run_traces(traces, session, seed=7))
        assert all(r.ok for r in results), [r.error for r in results]
        for result, trace in zip(results, traces):
            assert len(result.record["generated_ids"]) == result.generated == trace.generated
            assert len(result.ttft_s) == len(trace.turns)
            assert all(0 < f <= t for f, t in zip(result.ttft_s, result.turn_s))
        got = [r.record for r in results]
        assert outputs is None or got == outputs
        outputs = got
    # in blocks of 3 tokens: more calls, the same tokens (a 9-token turn: 1, 3, 3, 2)
    session = _session(model, "base_shared", 2, tokenizer=NullTokenizer(), config=cfg)
    engine = RolloutEngine(session, record_calls=True)
    blocked = list(run_traces(traces, session, seed=7, engine=engine, block_tokens=3))
    assert [r.record for r in blocked] == outputs
    assert max(c.decode_steps for c in engine.batcher.calls) == 3
    turn_calls = sum(1 + -(-(g - 1) // 3) for t in traces for _, _, g in
                     ((x.agent, x.append, x.generate) for x in t.turns))
    assert sum(c.rows for c in engine.batcher.calls) == turn_calls
    with pytest.raises(ValueError, match="block_tokens must be an int >= 0.*-1"):
        list(run_traces(traces, session, block_tokens=-1))
    # a trace longer than the row fails alone; a model with EOS ids is refused
    long = _trace("long", 300, [("plan", 1, 1)])
    results = list(run_traces(traces + [long], session, seed=7))
    assert [r.ok for r in results] == [True, True, True, False]
    assert "trace 'long' (task 3) needs 302 positions, more than the row capacity 256" in \
        results[3].error
    assert [r.record for r in results[:3]] == outputs
    eos_session = _session(model, "base_shared", 1)
    bad = list(run_traces(traces[:1], eos_session))[0]
    assert "needs a model without EOS ids" in bad.error


def test_sampled_episodes_are_deterministic_whatever_rows_and_order(model):
    runs = []
    for rows, order in ((1, [0, 1, 2, 3, 4]), (3, [4, 2, 0, 3, 1])):
        session = _session(model, "base_lowrank_shared", rows)
        tasks = [TASKS[i] for i in order]
        results = list(run_workflow(TalkWorkflow(), tasks, session, temperature=1.0,
                                    seed=lambda i, task: TASKS.index(task)))
        runs.append({order[r.index]: dataclasses.replace(r.record, episode=0) for r in results})
    assert runs[0] == runs[1]
    # an int seed gives each stream position its own seed
    assert episode_seed(0, 1, None) != episode_seed(0, 2, None) == episode_seed(0, 2, "x")


# ------------------------------------------------------------------------------- memory budget


@pytest.mark.parametrize("mode", [m.value for m in ALL_MODES])
def test_row_count_from_budget_matches_the_analytic_bytes(model, mode):
    cfg, params, lora, adapters = model
    probe = plan_rows(cfg, mode, capacity=256, lora=lora, cache_dtype=jnp.float32,
                      budget_bytes=1 << 30, prefill_chunk=64, headroom=0.0)
    per_row = probe.bytes_per_row
    assert per_row == probe.cache_bytes_per_row + activation_bytes_per_row(
        cfg, capacity=256, prefill_chunk=64, dtype=jnp.float32, attention_scores=True)
    for rows in (1, 3, 7):
        budget = rows * per_row + per_row // 2
        plan = plan_rows(cfg, mode, capacity=256, lora=lora, cache_dtype=jnp.float32,
                         budget_bytes=budget, prefill_chunk=64, headroom=0.0)
        assert plan.rows == rows
        session = _session(model, mode, plan.rows)
        assert session.analytic_cache_bytes()["total"] == plan.cache_bytes
        assert session.cache_bytes()["total"] == plan.cache_bytes
        assert f"{rows} rows of mode {mode}" in plan.describe()
    # headroom is kept back from the budget
    plan = plan_rows(cfg, mode, capacity=256, lora=lora, cache_dtype=jnp.float32,
                     budget_bytes=10 * per_row, prefill_chunk=64, headroom=0.25)
    assert plan.rows == int(10 * per_row * 0.75) // per_row


def test_sharing_fits_more_rows_in_one_budget():
    cfg = ModelConfig.llama3_1_8b()
    lora = LoraConfig(rank=8, targets=("q", "v"))
    rows = {m.value: plan_rows(cfg, m, capacity=16640, lora=lora, budget_bytes=100 << 30,
                               prefill_chunk=2048, attention_scores=False).rows
            for m in ALL_MODES}
    assert rows["base_lowrank_shared"] >= 2.5 * rows["non_shared"]
    assert rows["fully_shared"] >= rows["base_lowrank_shared"] >= rows["base_shared"]


def test_too_small_a_budget_fails_naming_budget_mode_and_bytes(model):
    cfg, _, lora, _ = model
    need = plan_rows(cfg, "non_shared", capacity=256, lora=lora, budget_bytes=1 << 30,
                     headroom=0.1).bytes_per_row
    with pytest.raises(ValueError) as info:
        plan_rows(cfg, "non_shared", capacity=256, lora=lora, budget_bytes=need - 1, headroom=0.1)
    message = str(info.value)
    assert f"({need - 1} bytes, given) fits no row of mode 'non_shared' at capacity 256" in message
    assert f"one row needs {need} bytes" in message
    with pytest.raises(ValueError, match="reports no memory statistics.*pass budget_bytes"):
        if jax.default_backend() != "cpu":
            pytest.skip("the device reports its memory")
        plan_rows(cfg, "non_shared", capacity=256, lora=lora)
    with pytest.raises(ValueError, match="budget_bytes must be > 0; got -5"):
        plan_rows(cfg, "non_shared", capacity=256, lora=lora, budget_bytes=-5)
