"""The OpenAI request and response shapes: validation of ``/v1/completions`` and
``/v1/chat/completions`` bodies into a ``GenerationRequest``, and the JSON the server answers.

Every field a client can send is checked; a bad one raises ``APIError`` (an OpenAI-style 4xx body
naming the field and what is allowed). OpenAI fields this server cannot honour are refused unless
they hold their neutral value (``n`` 1, ``echo`` false, penalties 0, no logit bias, no tools), so
that no request silently gets something else than it asked for; unknown fields are refused as
OpenAI refuses them. Extensions: ``top_k``, ``trajectory`` (pin a request to a trajectory, as
``user`` also does), ``return_token_ids`` (the prompt and completion token ids in the response).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from lragent_jax.session import GenerationSettings

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_LENGTH = 256
MAX_PIN_LENGTH = 256
ROLES = ("system", "developer", "user", "assistant", "tool")
# chat markers of the plain layout used when the tokenizer has no chat template of its own
PLAIN_CHAT_START, PLAIN_CHAT_END = "<|im_start|>", "<|im_end|>"

COMMON_FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n",
                 "stream", "stream_options", "user", "trajectory", "return_token_ids")
COMPLETION_FIELDS = COMMON_FIELDS + ("prompt",)
CHAT_FIELDS = COMMON_FIELDS + ("messages", "max_completion_tokens")
# accepted only with these neutral values (they would otherwise change the result)
NEUTRAL = {
    "echo": (None, False), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
    "best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]),
}
IGNORED = ("metadata", "store", "service_tier", "parallel_tool_calls")  # no effect on the output


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A validated request: ``agent`` is a role name or None (the bare base model); ``stop``
    holds the client's stop strings and, for chat, the end-of-turn markers."""

    kind: str  # "completion" or "chat"
    model: str
    agent: str | None
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    stream: bool = False
    include_usage: bool = False
    pin: str | None = None
    return_token_ids: bool = False

    def settings(self, max_new_tokens: int) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=max_new_tokens, temperature=self.temperature,
                                  top_p=self.top_p, top_k=self.top_k, stop=self.stop,
                                  stop_token_ids=self.stop_token_ids, seed=self.seed)


@dataclasses.dataclass(frozen=True)
class ServingContext:
    """What validation needs to know about the served model."""

    tokenizer: Any
    models: Mapping[str, str | None]  # served name -> role name (None: the bare base model)
    base_name: str
    vocab_size: int
    capacity: int
    completion_max_tokens: int = 16  # OpenAI's default for completions
    chat_max_tokens: int = 1024  # without max_tokens a chat answer runs to its end, at most this

    def render_chat(self, messages: list[dict]) -> str:
        template = getattr(self.tokenizer, "chat_template", None)
        if template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return "".join(f"{PLAIN_CHAT_START}{m['role']}\n{m['content']}{PLAIN_CHAT_END}\n"
                       for m in messages) + f"{PLAIN_CHAT_START}assistant\n"

    def chat_stops(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Stop strings and token ids that end an assistant turn (the strings are cut from the
        output): the tokenizer's end-of-turn tokens, or the plain layout's end marker."""
        if not getattr(self.tokenizer, "chat_template", None):
            return (PLAIN_CHAT_END,), ()
        ids = tuple(getattr(self.tokenizer, "chat_stop_token_ids", ()))
        eos = set(getattr(self.tokenizer, "eos_token_ids", ()))
        strings = tuple(self.tokenizer.decode([i]) for i in ids if i not in eos)
        return tuple(s for s in strings if s), tuple(i for i in ids if i not in eos)


# ----------------------------------------------------------------------------------- parsing


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad encoding, too deep
        raise bad(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object; got {type(body).__name__}",
                  code="invalid_json")
    return body


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(value, neutral) -> bool:
    if neutral is None or isinstance(neutral, bool):
        return value is neutral
    if isinstance(neutral, (int, float)):
        return _is_number(value) and value == neutral
    return value == neutral


def _check_fields(body: dict, allowed: tuple[str, ...]) -> None:
    for name, value in body.items():
        if name in allowed or name in IGNORED:
            continue
        if name in NEUTRAL:
            if not any(_same(value, v) for v in NEUTRAL[name]):
                neutral = ", ".join(json.dumps(v) for v in NEUTRAL[name])
                raise bad(f"{name}={json.dumps(value)[:80]} is not supported by this server "
                          f"(allowed: {neutral})", param=name, code="unsupported_parameter")
            continue
        raise bad(f"Unrecognized request argument supplied: {name} (supported: "
                  f"{', '.join(sorted(allowed))})", param=name, code="unknown_parameter")


def _model(body: dict, ctx: ServingContext) -> tuple[str, str | None]:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise bad("model is required: the name of a role adapter or of the base model "
                  f"(available: {', '.join(ctx.models)})", param="model")
    if name not in ctx.models:
        raise APIError(404, f"The model {name!r} does not exist; available: "
                            f"{', '.join(ctx.models)}", param="model", code="model_not_found")
    return name, ctx.models[name]


def _optional_number(body: dict, name: str, default: float, check: Callable[[float], bool],
                     allowed: str) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value) or not check(value):
        raise bad(f"{name}={json.dumps(value)[:80]} is invalid; {name} must be {allowed}",
                  param=name)
    return float(value)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not stops or len(stops) > MAX_STOP_STRINGS
            or any(not isinstance(s, str) or not s or len(s) > MAX_STOP_LENGTH for s in stops)):
        raise bad(f"stop={json.dumps(stop)[:120]} is invalid; stop must be a non-empty string or "
                  f"a list of 1 to {MAX_STOP_STRINGS} non-empty strings of at most "
                  f"{MAX_STOP_LENGTH} characters", param="stop")
    return tuple(dict.fromkeys(stops))


def _pin(body: dict) -> str | None:
    for name in ("trajectory", "user"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not 0 < len(value) <= MAX_PIN_LENGTH:
            raise bad(f"{name} must be a string of 1 to {MAX_PIN_LENGTH} characters; got "
                      f"{json.dumps(value)[:80]}", param=name)
    return body.get("trajectory") or body.get("user")


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false; got {json.dumps(value)[:80]}", param=name)
    return value


def _common(body: dict, ctx: ServingContext, kind: str, prompt_ids: list[int],
            prompt_param: str, max_tokens_field: str) -> GenerationRequest:
    model, agent = _model(body, ctx)
    n = body.get("n")
    if n is not None and n != 1 or isinstance(n, bool):
        raise bad(f"n={json.dumps(n)[:40]}: this server returns one choice per request; n must be "
                  "1 (send several requests, with different seeds if sampling)", param="n")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options is only allowed when stream is true",
                      param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(
                options.get("include_usage", False), bool):
            raise bad(f"stream_options must be {{\"include_usage\": true|false}}; got "
                      f"{json.dumps(options)[:80]}", param="stream_options")
        include_usage = options.get("include_usage", False)
    temperature = _optional_number(body, "temperature", 1.0, lambda v: 0 <= v <= 2,
                                   "a number in [0, 2] as for OpenAI (0: greedy; default 1)")
    top_p = _optional_number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = body.get("top_k")
    if top_k is None or top_k == -1:
        top_k = 0
    elif not _is_int(top_k) or top_k < 0:
        raise bad(f"top_k={json.dumps(top_k)[:40]} is invalid; top_k must be an integer >= 0 "
                  "(0 or -1: off)", param="top_k")
    elif top_k >= ctx.vocab_size:
        top_k = 0  # keeps every token: the same as off (and fits the device's int32)
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not -2 ** 63 <= seed < 2 ** 64:
            raise bad(f"seed={json.dumps(seed)[:40]} is invalid; seed must be a 64-bit integer",
                      param="seed")
        seed &= 0xFFFFFFFF
    stops = _stop(body)
    extra_stops: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    if kind == "chat":
        extra_stops, stop_ids = ctx.chat_stops()

    if not prompt_ids:
        raise bad(f"{prompt_param} encodes to no tokens; send a non-empty prompt",
                  param=prompt_param)
    if len(prompt_ids) > ctx.capacity:
        raise bad(f"{prompt_param}: {len(prompt_ids)} tokens, more than this model's maximum "
                  f"context length of {ctx.capacity} tokens", param=prompt_param,
                  code="context_length_exceeded")
    room = ctx.capacity - len(prompt_ids) + 1  # the last new token needs no cache entry
    max_tokens = body.get(max_tokens_field)
    if max_tokens is None and max_tokens_field == "max_completion_tokens":
        max_tokens_field = "max_tokens"
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        default = ctx.chat_max_tokens if kind == "chat" else ctx.completion_max_tokens
        max_tokens = min(default, room)
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise bad(f"{max_tokens_field}={json.dumps(max_tokens)[:40]} is invalid; it must be an "
                  "integer >= 1", param=max_tokens_field)
    elif max_tokens > room:
        raise bad(f"{max_tokens_field}={max_tokens} does not fit: this model's maximum context "
                  f"length is {ctx.capacity} tokens and the {prompt_param} take "
                  f"{len(prompt_ids)}; at most {room} new tokens fit",
                  param=max_tokens_field, code="context_length_exceeded")
    request = GenerationRequest(
        kind=kind, model=model, agent=agent, prompt_ids=tuple(prompt_ids), max_tokens=max_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop=tuple(dict.fromkeys(stops + extra_stops)), stop_token_ids=stop_ids, stream=stream,
        include_usage=include_usage, pin=_pin(body),
        return_token_ids=_bool(body, "return_token_ids"))
    try:
        request.settings(max_tokens)  # the session's own checks, before anything runs
    except ValueError as e:
        raise bad(str(e)) from None
    return request


def parse_completion(body: dict, ctx: ServingContext) -> GenerationRequest:
    _check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = list(ctx.tokenizer.encode(prompt))
    elif isinstance(prompt, list) and prompt and set(map(type, prompt)) == {int}:
        # (no bools: their type is bool) checked in C: a 16k-token prompt costs 0.3 ms here, not 2
        bad_ids = [t for t in prompt if not 0 <= t < ctx.vocab_size]
        if bad_ids:
            raise bad(f"prompt token ids {bad_ids[:5]} are out of range; ids must be in "
                      f"0..{ctx.vocab_size - 1}", param="prompt")
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(
            isinstance(p, (str, list)) for p in prompt):
        raise bad(f"prompt holds {len(prompt)} prompts; this server takes one prompt per request "
                  "(send several requests)", param="prompt")
    else:
        raise bad("prompt must be a string or a non-empty list of token ids; got "
                  f"{json.dumps(prompt)[:80]}", param="prompt")
    return _common(body, ctx, "completion", ids, "prompt", "max_tokens")


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        if message["role"] == "assistant":
            return ""
        raise bad(f"messages[{i}].content is required for role {message['role']!r}",
                  param=f"messages[{i}].content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"messages[{i}].content[{j}] has type {kind!r}; only text parts "
                          "({\"type\": \"text\", \"text\": ...}) are supported",
                          param=f"messages[{i}].content[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts; got "
              f"{type(content).__name__}", param=f"messages[{i}].content")


def parse_chat(body: dict, ctx: ServingContext) -> GenerationRequest:
    _check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {\"role\", \"content\"} objects",
                  param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise bad(f"messages[{i}].role={json.dumps(role)[:40]} is invalid; allowed: "
                      f"{', '.join(ROLES)}", param=f"messages[{i}].role")
        unknown = set(m) - {"role", "content", "name"}
        if unknown:
            raise bad(f"messages[{i}] has unsupported fields {sorted(unknown)} (supported: role, "
                      "content, name)", param=f"messages[{i}]")
        entry = {"role": m["role"], "content": _content(m, i)}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise bad(f"messages[{i}].name must be a string", param=f"messages[{i}].name")
            entry["name"] = m["name"]
        clean.append(entry)
    try:
        text = ctx.render_chat(clean)
    except Exception as e:  # the model's template refuses the conversation (e.g. role order)
        raise bad(f"the model's chat template cannot render these messages: {e}",
                  param="messages") from None
    return _common(body, ctx, "chat", list(ctx.tokenizer.encode(text)), "messages",
                   "max_completion_tokens")


# ----------------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def response(request: GenerationRequest, rid: str, created: int, text: str, finish: str,
             token_ids: list[int], use: dict) -> dict:
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if request.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    if request.return_token_ids:
        choice["prompt_token_ids"] = list(request.prompt_ids)
        choice["token_ids"] = list(token_ids)
    return {"id": rid, "object": "chat.completion" if request.kind == "chat" else
            "text_completion", "created": created, "model": request.model,
            "system_fingerprint": None, "choices": [choice], "usage": use}


def chunk(request: GenerationRequest, rid: str, created: int, text: str | None,
          finish: str | None = None, *, first: bool = False, token_ids=None) -> dict:
    """One streamed chunk. With ``return_token_ids`` the first chunk carries the prompt's ids and
    the last (``token_ids``) the completion's."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if request.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        elif first:
            delta["content"] = ""
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    if request.return_token_ids and first:
        choice["prompt_token_ids"] = list(request.prompt_ids)
    if token_ids is not None:
        choice["token_ids"] = list(token_ids)
    return {"id": rid, "object": "chat.completion.chunk" if request.kind == "chat" else
            "text_completion", "created": created, "model": request.model,
            "system_fingerprint": None, "choices": [choice]}


def usage_chunk(request: GenerationRequest, rid: str, created: int, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if request.kind == "chat" else
            "text_completion", "created": created, "model": request.model,
            "system_fingerprint": None, "choices": [], "usage": use}


def now() -> int:
    return int(time.time())
