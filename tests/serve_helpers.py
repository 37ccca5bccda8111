"""Shared pieces of the server tests: a tiny random model with three role adapters, a real server
on a free port of 127.0.0.1, raw HTTP requests, and the in-process reference (one ``Session``
turn)."""

from __future__ import annotations

import contextlib
import http.client
import json

import jax

from eval.cli import tiny_config
from lragent_jax.config import LoraConfig
from lragent_jax.lora import init_adapters
from lragent_jax.model import init_params
from lragent_jax.pretrained import Model
from lragent_jax.serve.server import IdTokenizer, ServerThread, build_server
from lragent_jax.session import GenerationSettings, Turn

ROLES = ("plan", "action", "reflect")
# few compiled shapes: one prefill bucket (64) for most turns, one output bucket per block size
SESSION = dict(capacity=256, prefill_chunk=64, min_chunk_bucket=64)


def tiny_model() -> Model:
    """Byte-sized vocabulary; one character per token (``IdTokenizer``), so a client that resends
    the text it got back resends the same tokens."""
    cfg = tiny_config()
    lora = LoraConfig(rank=4, targets=("q", "v", "o", "down"), agents=ROLES)
    return Model(config=cfg, params=init_params(jax.random.key(0), cfg),
                 tokenizer=IdTokenizer(cfg.vocab_size),
                 adapters=init_adapters(jax.random.key(1), cfg, lora, b_scale=0.3), lora=lora)


_marks = iter(range(0x183, 0x203))


def fresh(prompt: str) -> str:
    """``prompt`` behind a first character no other prompt of the tests has (one token of
    ``IdTokenizer``): nothing in the cache matches it, so the server prefills all of it as a new
    session would. (Tokens another agent prefilled are reused in the shared modes: the mode's
    approximation, checked against in-process sessions doing the same turns.)"""
    return chr(next(_marks)) + prompt


@contextlib.contextmanager
def running(model: Model, **options):
    """A started server (engine + uvicorn thread) for ``model``; yields (server, base url)."""
    options = {**SESSION, **options}
    server = build_server(model, **options)
    try:
        with ServerThread(server.app) as thread:
            yield server, thread.url
    finally:
        server.close()


def client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(url: str, path: str, body, *, raw: bool = False, method: str = "POST"):
    """(status, parsed JSON body) of a request sent with the standard library."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        data = body if raw else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        return response.status, json.loads(payload) if payload else None
    finally:
        conn.close()


def get(url: str, path: str):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample of the Prometheus text ``text`` (0 when absent)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def reference(model: Model, prompt_ids, agent, max_tokens, *, mode="base_lowrank_shared",
              rows: int = 1, stop=(), stop_token_ids=(), temperature=0.0, seed=None):
    """The ``TurnResult`` of one in-process session turn for the same request."""
    session = model.session(mode, batch=rows, **SESSION)
    settings = GenerationSettings(max_new_tokens=max_tokens, stop=tuple(stop),
                                  stop_token_ids=tuple(stop_token_ids), temperature=temperature,
                                  seed=seed)
    return session.turn({0: Turn(agent, append_ids=tuple(prompt_ids), settings=settings)})[0]
