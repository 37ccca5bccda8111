"""The OpenAI-compatible server, driven by the official ``openai`` client over HTTP on 127.0.0.1:
completions and chat, streamed and not, equal to in-process session turns; stop strings, seeds,
OpenAI-style errors for bad requests (and the server stays up), /health, /models, /metrics."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from tests.serve_helpers import (ROLES, SESSION, client, fresh, get, metric,  # noqa: E402
                                 post, reference, running, tiny_model)

BLOCK = 8  # tokens per engine call: a 20-token answer takes three calls
PROMPTS = ["Hello there, plan the next step:", "Question: where is it?\nThought:",
           "The quick brown fox", "x"]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def server(model):
    with running(model, rows=4, block_tokens=BLOCK) as (srv, url):
        yield srv, url, client(url)


def _ids(model, text):
    return model.tokenizer.encode(text)


def test_models_and_health(server):
    srv, url, api = server
    assert [m.id for m in api.models.list().data] == [*ROLES, "tiny"]
    card = api.models.retrieve("action")
    assert card.id == "action" and card.owned_by == "lragent-jax"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("nope")
    status, body = post(url, "/health", None, method="GET")
    assert status == 200 and body["status"] == "ok" and body["rows"] == 4
    assert body["mode"] == "base_lowrank_shared" and body["capacity"] == SESSION["capacity"]


@pytest.mark.parametrize("agent", [*ROLES, None])
def test_greedy_completions_equal_session_turns(model, server, agent):
    srv, url, api = server
    for prompt in map(fresh, PROMPTS[:3]):
        expect = reference(model, _ids(model, prompt), agent, 20)
        r = api.completions.create(model=agent or "tiny", prompt=prompt, max_tokens=20,
                                   temperature=0, extra_body={"return_token_ids": True})
        choice = r.choices[0]
        assert choice.text == expect.text, (agent, prompt)
        assert choice.token_ids == expect.token_ids
        assert choice.prompt_token_ids == _ids(model, prompt)
        assert choice.finish_reason == ("length" if len(expect.token_ids) == 20 else "stop")
        assert r.usage.prompt_tokens == len(_ids(model, prompt))
        assert r.usage.completion_tokens == len(expect.token_ids)
        assert r.object == "text_completion" and r.model == (agent or "tiny")


def test_prompt_as_token_ids(model, server):
    srv, url, api = server
    ids = _ids(model, fresh(PROMPTS[1]))
    expect = reference(model, ids, "plan", 12)
    r = api.completions.create(model="plan", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == expect.text


def test_streaming_sends_the_same_text_in_chunks(model, server):
    srv, url, api = server
    prompt = fresh(PROMPTS[2])
    expect = reference(model, _ids(model, prompt), "reflect", 20)
    chunks = list(api.completions.create(model="reflect", prompt=prompt, max_tokens=20,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expect.text
    content = [c for c in chunks if c.choices and c.choices[0].text]
    assert len(content) >= 3  # the first token alone, then a chunk per block of 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        len(expect.token_ids)
    assert len({c.id for c in chunks}) == 1


def test_chat_completions_use_the_chat_layout(model, server):
    srv, url, api = server
    system = fresh("You plan.")
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": "What next?"}]
    prompt = srv.context.render_chat(messages)
    assert prompt.endswith("<|im_start|>assistant\n")
    expect = reference(model, _ids(model, prompt), "plan", 16, stop=("<|im_end|>",))
    r = api.chat.completions.create(model="plan", messages=messages, max_tokens=16,
                                    temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expect.text
    assert r.usage.prompt_tokens == len(_ids(model, prompt))
    chunks = list(api.chat.completions.create(model="plan", messages=messages, max_tokens=16,
                                              temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expect.text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # content given as text parts renders the same prompt
    parts = [{"role": "system", "content": [{"type": "text", "text": system}]},
             {"role": "user", "content": [{"type": "text", "text": "What "},
                                          {"type": "text", "text": "next?"}]}]
    r2 = api.chat.completions.create(model="plan", messages=parts, max_tokens=16, temperature=0)
    assert r2.choices[0].message.content == expect.text


def test_stop_strings_end_the_output_within_and_across_blocks(model, server):
    srv, url, api = server
    # one token (the session stops on the device) and three tokens spanning the first block's end
    for piece in (slice(5, 6), slice(6, 9)):
        for stream in (False, True):
            full = ""
            while len(full) < 24:  # an answer without EOS (one character per token)
                prompt = fresh(PROMPTS[0])
                full = reference(model, _ids(model, prompt), "action", 24).text
            stop = full[piece]
            expect = full[:full.find(stop)]
            r = api.completions.create(model="action", prompt=prompt, max_tokens=24,
                                       temperature=0, stop=[stop], stream=stream)
            if stream:
                chunks = list(r)
                text = "".join(c.choices[0].text for c in chunks)
                finish = chunks[-1].choices[0].finish_reason
            else:
                text, finish = r.choices[0].text, r.choices[0].finish_reason
            assert (text, finish) == (expect, "stop"), (stop, stream)
    # the row now ends where the output was cut: a continuation from there reuses all of it
    r = api.completions.create(model="action", prompt=prompt, max_tokens=24, temperature=0,
                               stop=[stop])
    follow = api.completions.create(model="plan", prompt=prompt + r.choices[0].text + "!",
                                    max_tokens=4, temperature=0)
    assert follow.usage.prompt_tokens_details.cached_tokens == len(prompt) + \
        len(r.choices[0].text)


def test_a_seed_gives_the_same_sample_for_the_same_request(server):
    srv, url, api = server

    def sample(seed, **extra):
        return api.completions.create(model="plan", prompt=PROMPTS[1], max_tokens=20,
                                      temperature=1.0, top_p=0.9, seed=seed,
                                      extra_body=extra or None).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert sample(7, top_k=10 ** 12) == first  # a top_k past the vocabulary keeps every token
    assert any(sample(seed) != first for seed in (8, 9, 10))


BAD = [
    # (body or raw bytes, status, param named)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "plan", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "plan", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "plan", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "plan", "prompt": "x", "temperature": 1e300}, 400, "temperature"),
    ({"model": "plan", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "plan", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": "plan", "prompt": "x", "top_k": -5}, 400, "top_k"),
    ({"model": "plan", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "plan", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "plan", "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"model": "plan", "prompt": "y" * (SESSION["capacity"] + 1)}, 400, "prompt"),
    ({"model": "plan", "prompt": "y" * 200, "max_tokens": 100}, 400, "max_tokens"),
    ({"model": "plan", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "plan", "prompt": "x", "stop": ""}, 400, "stop"),
    ({"model": "plan", "prompt": "x", "seed": "x"}, 400, "seed"),
    ({"model": "plan", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "plan", "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ({"model": "plan", "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "plan", "prompt": "x", "logprobs": 5}, 400, "logprobs"),
    ({"model": "plan", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": "plan", "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": "plan", "prompt": ""}, 400, "prompt"),
    ({"model": "plan", "prompt": [5, 100000]}, 400, "prompt"),
    ({"model": "plan", "prompt": [5, True, 7]}, 400, "prompt"),
    ({"model": "plan", "prompt": [5, 6.0]}, 400, "prompt"),
    ({"model": "plan", "prompt": {"text": "x"}}, 400, "prompt"),
    ({"model": "plan", "prompt": "x", "trajectory": 5}, 400, "trajectory"),
]
BAD_CHAT = [
    ({"model": "plan"}, 400, "messages"),
    ({"model": "plan", "messages": []}, 400, "messages"),
    ({"model": "plan", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "plan", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"model": "plan", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400,
     "messages[0].content[0]"),
    ({"model": "plan", "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, 400,
     "messages[0]"),
    ({"model": "plan", "messages": [{"role": "user", "content": "x"}], "tools": [{"x": 1}]}, 400,
     "tools"),
    ({"model": "plan", "messages": [{"role": "user", "content": "x"}],
      "max_completion_tokens": -1}, 400, "max_completion_tokens"),
]


def test_bad_requests_get_openai_errors_and_the_server_stays_up(model, server):
    srv, url, api = server
    prompt = fresh(PROMPTS[0])
    before = reference(model, _ids(model, prompt), "plan", 12).text
    cases = [("/v1/completions",) + c for c in BAD] + [("/v1/chat/completions",) + c
                                                      for c in BAD_CHAT]
    for path, body, status, param in cases:
        got, error = post(url, path, body, raw=isinstance(body, bytes))
        assert got == status, (body, got, error)
        assert set(error["error"]) == {"message", "type", "param", "code"}, error
        assert error["error"]["param"] == param, (body, error)
        assert error["error"]["message"]
        if param is not None and param.split("[")[0] not in ("messages",):
            assert param.split("[")[0] in error["error"]["message"], error
    # unknown routes and methods answer in the same format
    got, error = post(url, "/v1/engines", {})
    assert got == 404 and "no route" in error["error"]["message"]
    got, error = post(url, "/v1/completions", None, method="GET")
    assert got == 405 and error["error"]["message"]
    # the openai client sees them as its own error types
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        api.completions.create(model="plan", prompt="x", n=2)
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    # still up, and every trajectory as it was: the same answer as before
    status, health = post(url, "/health", None, method="GET")
    assert status == 200 and health["status"] == "ok"
    r = api.completions.create(model="plan", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == before


def shape_counts(text: str, name: str, before: str) -> dict:
    """``{(rows, chunk_bucket): growth}`` of a by-shape counter between two /metrics texts."""
    def read(t):
        out = {}
        for line in t.splitlines():
            if line.startswith(name + "{"):
                labels, value = line[len(name) + 1:].rsplit("} ", 1)
                kv = dict(x.split("=") for x in labels.split(","))
                out[(int(kv["rows"].strip('"')), int(kv["chunk_bucket"].strip('"')))] = float(value)
        return out
    now, then = read(text), read(before)
    return {k: v - then.get(k, 0.0) for k, v in now.items() if v - then.get(k, 0.0)}


def test_metrics_in_prometheus_text(server):
    srv, url, api = server
    status, before = get(url, "/metrics")
    assert status == 200
    r = api.completions.create(model="reflect", prompt=PROMPTS[3] * 3, max_tokens=5,
                               temperature=0)
    status, after = get(url, "/metrics")
    assert "# TYPE lragent_time_to_first_token_seconds histogram" in after
    assert metric(after, "lragent_requests_total", endpoint="/v1/completions", status="200") == \
        metric(before, "lragent_requests_total", endpoint="/v1/completions", status="200") + 1
    assert metric(after, "lragent_prompt_tokens_total", model="reflect") == metric(
        before, "lragent_prompt_tokens_total", model="reflect") + r.usage.prompt_tokens
    assert metric(after, "lragent_completion_tokens_total", model="reflect") == metric(
        before, "lragent_completion_tokens_total", model="reflect") + r.usage.completion_tokens
    assert metric(after, "lragent_time_to_first_token_seconds_count") == metric(
        before, "lragent_time_to_first_token_seconds_count") + 1
    assert metric(after, "lragent_rows") == 4
    assert 1 <= metric(after, "lragent_rows_in_use") <= 4
    assert metric(after, "lragent_rows_busy") == 0
    assert metric(after, "lragent_engine_calls_total") > metric(before,
                                                                "lragent_engine_calls_total")
    # the prefill slots the calls computed hold the request's prefilled tokens, padding beside
    slots = metric(after, "lragent_engine_prefill_slots_total") - metric(
        before, "lragent_engine_prefill_slots_total")
    prefilled = metric(after, "lragent_prefilled_tokens_total", model="reflect") - metric(
        before, "lragent_prefilled_tokens_total", model="reflect")
    assert slots >= prefilled > 0
    # every call counted once by its shape (one row: only this request ran), seconds beside each
    calls = metric(after, "lragent_engine_calls_total") - metric(before, "lragent_engine_calls_total")
    shapes = shape_counts(after, "lragent_engine_calls_by_shape_total", before)
    assert sum(shapes.values()) == calls and {rows for rows, _ in shapes} == {1}
    assert max(chunk for _, chunk in shapes) >= 16
    seconds = shape_counts(after, "lragent_engine_call_seconds_by_shape_total", before)
    assert set(seconds) == set(shapes) and all(v > 0 for v in seconds.values())
    # a pinned trajectory's next request times its client's round trip, no other request does
    api.completions.create(model="plan", prompt=PROMPTS[1], max_tokens=3, temperature=0,
                           extra_body={"trajectory": "metrics-rt"})
    t0 = time.perf_counter()
    r = api.completions.create(model="action", prompt=PROMPTS[1] + " then", max_tokens=3,
                               temperature=0, extra_body={"trajectory": "metrics-rt"})
    elapsed = time.perf_counter() - t0
    status, last = get(url, "/metrics")
    count = "lragent_client_return_seconds_count"
    assert metric(last, count) == metric(after, count) + 1
    gap = metric(last, "lragent_client_return_seconds_sum") - metric(
        after, "lragent_client_return_seconds_sum")
    assert 0 <= gap <= elapsed  # from the first answer to the second request's arrival
    assert "# TYPE lragent_engine_gather_seconds_total counter" in last
