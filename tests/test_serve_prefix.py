"""Prefix reuse across agents, verified token by token: which row a request takes (unit tests of
``RowTable``), and over HTTP: a growing multi-agent prompt prefills each token once and gives the
in-process session's tokens, a diverging prompt reuses only the common prefix, non_shared reuses
per adapter, and rows that run out are evicted least recently used."""

from __future__ import annotations

import pytest

from lragent_jax.serve.prefix import Placement, RowTable, common_prefix
from lragent_jax.session import GenerationSettings, Turn

# ------------------------------------------------------------------------- row choice (no model)


def _used(table, *rows):
    """Mark ``rows`` as used, in this order (the last is the most recent)."""
    for row in rows:
        table.acquire(Placement(row, 0, 0, 0))
        table.release(row)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([5], [6]) == 0
    long = list(range(1000))
    assert common_prefix(long, long[:700] + [-1] + long[701:]) == 700
    assert common_prefix(long, long) == 1000


def test_an_extension_is_preferred_and_reuse_stops_before_the_last_prompt_token():
    table = RowTable(3)
    logs = [[1, 2, 3], [1, 2, 3, 4, 5], []]
    p = table.place([1, 2, 3, 4, 5, 6], logs, [len(x) for x in logs])
    assert (p.row, p.keep, p.reuse, p.discarded, p.evicted) == (1, 5, 5, 0, False)
    # the same prompt again: all of it matches, but its last token must run again
    p = table.place([1, 2, 3, 4, 5], logs, [len(x) for x in logs])
    assert (p.row, p.keep, p.reuse) == (1, 5, 4)


def test_a_row_is_cut_only_when_it_saves_more_than_it_loses():
    table = RowTable(2)
    retry = [list(range(1, 11)) + [50, 51], []]  # the prompt again, after a 2-token completion
    p = table.place(list(range(1, 11)), retry, [12, 0])
    assert (p.row, p.keep, p.reuse, p.discarded) == (0, 10, 9, 2)
    other = [[1, 2] + [9] * 20, []]  # shares 2 tokens, would lose 20: take the empty row
    p = table.place([1, 2, 3], other, [22, 0])
    assert (p.row, p.reuse) == (1, 0)


def test_reuse_is_limited_to_the_entries_the_agent_may_use():
    table = RowTable(2)
    logs = [[1, 2, 3, 4, 5, 6], []]
    p = table.place([1, 2, 3, 4, 5, 6, 7], logs, [2, 0])  # its view processed 2 of them
    assert (p.row, p.keep, p.reuse) == (0, 6, 2)


def test_least_recently_used_row_is_evicted_when_none_is_free():
    table = RowTable(3)
    _used(table, 2, 0, 1)  # row 2 used longest ago
    logs = [[7, 7], [8, 8, 8], [1, 9, 9, 9]]
    p = table.place([1, 2, 3], logs, [2, 3, 4])
    assert (p.row, p.keep, p.reuse, p.discarded, p.evicted) == (2, 1, 1, 3, True)
    for row in (0, 1, 2):
        table.acquire(Placement(row, 0, 0, 0))
    assert table.place([1, 2, 3], logs, [2, 3, 4]) is None  # every row busy: wait


def test_a_row_just_answered_is_not_evicted_during_its_grace():
    table = RowTable(1, grace=0.05)
    table.acquire(Placement(0, 0, 0, 0))
    table.release(0, now=10.0)
    logs = [[5, 6]]
    assert table.place([1, 2], logs, [2], now=10.01) is None  # another trajectory waits ...
    assert table.grace_ends(now=10.01) == pytest.approx(10.05)
    assert table.place([5, 6, 7], logs, [2], now=10.01).row == 0  # ... its own next turn not
    p = table.place([1, 2], logs, [2], now=10.06)
    assert p.evicted and p.row == 0
    assert table.grace_ends(now=10.06) is None
    table.acquire(Placement(0, 0, 0, 0), "t")
    table.release(0, now=20.0)
    table.forget("t")  # a released trajectory has no grace
    assert table.place([1, 2], logs, [2], now=20.0).row == 0


def test_pins_own_rows_until_evicted_or_forgotten():
    table = RowTable(2)
    logs = [[], []]
    a = table.place([1, 2], logs, [0, 0], pin="a")
    table.acquire(a, "a")
    logs[a.row] = [1, 2, 3]
    # while busy, a pinned request waits for its own row even though another is free
    assert table.place([1, 2, 3, 4], logs, [3, 0], pin="a") is None
    table.release(a.row)
    # an unpinned request sharing the whole row does not take a pinned row
    p = table.place([1, 2, 3, 4], logs, [3, 0])
    assert p.row != a.row
    # the pinned request takes its row whatever it loses
    p = table.place([1, 5], logs, [3, 0], pin="a")
    assert (p.row, p.keep, p.discarded, p.pinned) == (a.row, 1, 2, True)
    # forgotten: the first row to be reused, without counting as an eviction
    other = 1 - a.row
    _used(table, other)
    logs[other] = [4, 4]
    assert table.forget("a") and not table.forget("a")
    p = table.place([6, 6], logs, [3, 2])
    assert (p.row, p.evicted) == (a.row, False)


def test_an_evicted_pinned_row_loses_its_pin():
    table = RowTable(1)
    p = table.place([1], [[]], [0], pin="a")
    table.acquire(p, "a")
    table.release(p.row)
    q = table.place([2, 2], [[1, 5]], [2])  # the only row is pinned: evicted
    assert q.evicted and q.discarded == 2
    table.acquire(q)
    assert table.pinned_row("a") is None and table.owner(0) is None


# ------------------------------------------------------------------------- over HTTP

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from tests.serve_helpers import (SESSION, client, fresh, get, metric, post, reference,  # noqa: E402
                                 running, tiny_model)

BLOCK = 8


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def shared(model):
    with running(model, rows=4, block_tokens=BLOCK) as (srv, url):
        yield srv, url, client(url)


def _session(model, mode="base_lowrank_shared", rows=1):
    return model.session(mode, batch=rows, **SESSION)


def _settings(n):
    return GenerationSettings(max_new_tokens=n)


TURNS = [("plan", "Task: sort the list [3, 1, 2].\nThought:", 12),
         ("action", "\nAction:", 6), ("reflect", "\nObservation: done\nReflect:", 10),
         ("plan", "\nThought:", 12)]


@pytest.mark.parametrize("mode", ["base_lowrank_shared", "non_shared"])
def test_a_growing_multi_agent_prompt_equals_the_in_process_session(model, shared, mode):
    """A client resends the whole growing prompt, one agent after another: the server reuses what
    its row holds and prefills the rest, exactly as one in-process session does the same turns
    (base_lowrank_shared: each token once, whoever wrote it; non_shared: per adapter)."""
    if mode == "base_lowrank_shared":
        srv, url, api = shared
        ctx = None
    else:
        ctx = running(model, mode="non_shared", rows=2, block_tokens=BLOCK)
        srv, url = ctx.__enter__()
        api = client(url)
    try:
        session = _session(model, mode)
        text = fresh("")
        for i, (agent, append, n) in enumerate(TURNS):
            prompt = text + append
            expect = session.turn({0: Turn(agent, append_ids=tuple(model.tokenizer.encode(
                prompt[len(text):] if i else prompt)), settings=_settings(n))})[0]
            r = api.completions.create(model=agent, prompt=prompt, max_tokens=n, temperature=0)
            assert r.choices[0].text == expect.text, (mode, i)
            uncached = r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens
            assert uncached == expect.prefilled, (mode, i)
            if i and mode == "base_lowrank_shared":
                # everything the row held is reused but the last generated token, which was never
                # fed to the model: each token is prefilled once
                assert r.usage.prompt_tokens_details.cached_tokens == len(
                    model.tokenizer.encode(text)) - 1
            text = prompt + r.choices[0].text
        if mode == "non_shared":
            # each agent prefilled the whole trajectory itself once
            assert session.prefill_counts()["plan"] > len(TURNS[0][1])
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)


def test_a_diverging_prompt_reuses_only_the_common_prefix(model, shared):
    srv, url, api = shared
    status, before = get(url, "/metrics")
    prompt = fresh(" The plan is to")
    first = api.completions.create(model="plan", prompt=prompt, max_tokens=16, temperature=0)
    out = first.choices[0].text
    assert len(out) >= 8
    # the client changed the end of the answer: the row is cut back to where the texts part
    edited = prompt + out[:6] + "\x7f instead.\nAction:"
    assert out[6] != "\x7f"
    r = api.completions.create(model="action", prompt=edited, max_tokens=10, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens == len(prompt) + 6
    session = _session(model)
    ref_first = session.turn({0: Turn("plan", append_ids=tuple(model.tokenizer.encode(prompt)),
                                      settings=_settings(16))})[0]
    assert ref_first.text == out
    session.truncate(0, len(prompt) + 6)
    ref = session.turn({0: Turn("action", append_ids=tuple(model.tokenizer.encode(
        edited[len(prompt) + 6:])), settings=_settings(10))})[0]
    assert r.choices[0].text == ref.text
    status, after = get(url, "/metrics")
    assert metric(after, "lragent_prefix_divergences_total") == metric(
        before, "lragent_prefix_divergences_total") + 1
    # a request pinned to its trajectory is cut back even to a short common prefix
    pinned = fresh(" Pinned trajectory")
    api.completions.create(model="plan", prompt=pinned, max_tokens=8, temperature=0,
                           extra_body={"trajectory": "t-1"})
    r = api.completions.create(model="plan", prompt=pinned[:4] + "\x7f other", max_tokens=8,
                               temperature=0, extra_body={"trajectory": "t-1"})
    assert r.usage.prompt_tokens_details.cached_tokens == 4
    expect = reference(model, model.tokenizer.encode(pinned[:4] + "\x7f other"), "plan", 8)
    assert r.choices[0].text == expect.text  # plan wrote the 4 tokens it reuses: exact
    # the same unpinned prompt goes elsewhere: the pinned row is not another client's to cut
    r = api.completions.create(model="plan", prompt=pinned[:4] + "\x7f", max_tokens=4,
                               temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_non_shared_reuses_a_prefix_only_for_the_adapter_that_computed_it(model):
    with running(model, mode="non_shared", rows=2, block_tokens=BLOCK) as (srv, url):
        api = client(url)
        prompt = fresh(" Shared context for everyone.")
        out = api.completions.create(model="plan", prompt=prompt, max_tokens=8,
                                     temperature=0).choices[0].text
        longer = prompt + out + "\nAction:"
        r = api.completions.create(model="action", prompt=longer, max_tokens=6, temperature=0)
        assert r.usage.prompt_tokens_details.cached_tokens == 0  # action never saw it
        again = longer + r.choices[0].text + "\nThought:"
        r = api.completions.create(model="plan", prompt=again, max_tokens=6, temperature=0)
        assert r.usage.prompt_tokens_details.cached_tokens == len(prompt) + len(out) - 1
        # the bare base model shares the first role's cache view: never reused across the two
        r = api.completions.create(model="tiny", prompt=again, max_tokens=6, temperature=0)
        assert r.usage.prompt_tokens_details.cached_tokens == 0
        expect = reference(model, model.tokenizer.encode(again), None, 6, mode="non_shared")
        assert r.choices[0].text == expect.text


def test_rows_that_run_out_are_evicted_least_recently_used(model):
    with running(model, rows=2, block_tokens=BLOCK) as (srv, url):
        api = client(url)

        def ask(prompt, **extra):
            return api.completions.create(model="plan", prompt=prompt, max_tokens=6,
                                          temperature=0, extra_body=extra or None)

        a, b, c = fresh(" first client"), fresh(" second client"), fresh(" third client")
        out_a = ask(a).choices[0].text
        ask(b)
        ask(c)  # no row free: a's, the least recently used, is given up
        status, text = get(url, "/metrics")
        assert metric(text, "lragent_evictions_total") == 1
        assert metric(text, "lragent_evicted_tokens_total") == len(a) + len(out_a)
        r = ask(a + out_a + " more")  # a's trajectory is gone: nothing is reused ...
        assert r.usage.prompt_tokens_details.cached_tokens == 0
        expect = reference(model, model.tokenizer.encode(a + out_a + " more"), "plan", 6)
        assert r.choices[0].text == expect.text  # ... and nothing is wrong
        status, text = get(url, "/metrics")
        assert metric(text, "lragent_evictions_total") == 2  # b's went for it
        # pinned trajectories: one that is done is released, and reused without an eviction
        one, two = fresh(" pinned one"), fresh(" pinned two")
        ask(one, trajectory="one")
        ask(two, trajectory="two")
        assert post(url, "/v1/trajectories/one", None, method="DELETE") == (
            200, {"id": "one", "object": "trajectory", "released": True})
        assert post(url, "/v1/trajectories/none-such", None, method="DELETE")[1]["released"] \
            is False
        status, before = get(url, "/metrics")
        ask(fresh(" after release"))
        status, after = get(url, "/metrics")
        assert metric(after, "lragent_evictions_total") == metric(before,
                                                                  "lragent_evictions_total")
        r = ask(two + " and on", trajectory="two")  # untouched
        assert r.usage.prompt_tokens_details.cached_tokens >= len(two)
