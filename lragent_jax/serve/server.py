"""A server put together: the model (a checkpoint, the embedded default, or random weights of a
preset shape), its session, the engine and the app; run by uvicorn in the foreground
(``python -m lragent_jax.serve``) or in a thread (``ServerThread``, for tests and benchmarks)."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Sequence

import jax.numpy as jnp

from lragent_jax.pretrained import Model, load_pretrained, shipped_adapters_path
from lragent_jax.rollout.engine import Schedule
from lragent_jax.serve.app import create_app
from lragent_jax.serve.protocol import ServingContext
from lragent_jax.serve.scheduler import Engine


class IdTokenizer:
    """One character per token id, for models with random weights (no tokenizer of their own):
    decoding then encoding any output gives back its ids, so a client that resends the text
    resends the same tokens. Ids 3..130 are the ASCII characters (as ``ByteTokenizer``: an ASCII
    prompt has the same ids in both); every other id is one character from U+0100 on (skipping
    the surrogates). Other text encodes through its UTF-8 bytes as ``ByteTokenizer`` does."""

    bos_token_id, pad_token_id = 1, 0
    eos_token_ids: tuple[int, ...] = ()
    chat_template = None

    def __init__(self, vocab_size: int):
        if vocab_size < 259:
            raise ValueError(f"IdTokenizer needs a vocabulary of at least 259 ids; got "
                             f"{vocab_size}")
        self.vocab_size = vocab_size

    @staticmethod
    def _char(i: int) -> str:
        if 3 <= i < 131:
            return chr(i - 3)
        code = 0x100 + i
        return chr(code + 0x800 if code >= 0xD800 else code)

    def _id(self, ch: str) -> list[int]:
        code = ord(ch)
        if code < 128:
            return [code + 3]
        i = (code - 0x800 if code >= 0xE000 else code) - 0x100
        if 0 <= i < self.vocab_size and not 3 <= i < 131 and not 0xD800 <= code < 0xE000:
            return [i]
        return [b + 3 for b in ch.encode("utf-8")]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [i for ch in text for i in self._id(ch)]
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self._char(int(i)) for i in ids)


def load_model(model: str = "default", adapters: str | None = "default", *, dtype=jnp.float32,
               attn_impl: str | None = None) -> Model:
    """``model``: "default" (the embedded SmolLM2-135M-Instruct), an HF folder or a .gguf file;
    ``adapters``: a folder of exported role adapters, "default" (the shipped ones for the default
    model, none for others) or None / "none"."""
    source = None if model in (None, "default") else model
    if adapters == "default":
        folder = shipped_adapters_path() if source is None else None
        if source is None and folder is None:
            raise ValueError("--adapters default: the shipped adapters are missing from this "
                             "installation; give a folder or 'none'")
        adapters = str(folder) if folder is not None else None
    elif adapters == "none":
        adapters = None
    return load_pretrained(source, dtype=dtype, adapters=adapters, attn_impl=attn_impl)


def random_model(preset: str, *, rank: int = 8, targets=("q", "v"), dtype=jnp.bfloat16,
                 seed: int = 0, attn_impl: str | None = None) -> Model:
    """Random weights of a preset shape ("tiny", "llama3_1_8b", ...) without EOS ids, with random
    plan / action / reflect adapters (as the throughput benchmark builds them) and an
    ``IdTokenizer``: for speed measurements."""
    from eval.cli import tiny_config
    from eval.throughput import random_model as random_weights
    from lragent_jax.config import ModelConfig

    shape = tiny_config() if preset == "tiny" else ModelConfig.preset(preset)
    config, params, lora, adapters = random_weights(shape, rank=rank, targets=targets,
                                                    dtype=dtype, seed=seed)
    return Model(config=config, params=params, tokenizer=IdTokenizer(config.vocab_size),
                 adapters=adapters, lora=lora, attn_impl=attn_impl)


@dataclasses.dataclass
class Server:
    model: Model
    engine: Engine
    context: ServingContext
    app: object

    @property
    def session(self):
        return self.engine.session

    def close(self) -> None:
        self.engine.close()


def build_server(model: Model, *, mode: str = "base_lowrank_shared", rows: int = 8,
                 capacity: int = 4096, block_tokens: int = 16, stream_first_token: bool = True,
                 served_name: str | None = None, completion_max_tokens: int = 16,
                 chat_max_tokens: int = 1024, prefill_chunk: int = 512,
                 min_chunk_bucket: int = 16, min_new_bucket: int | None = None, seed: int = 0,
                 schedule: Schedule | None = None, max_waiting: int = 4096,
                 batch_wait: float | None = None, row_grace: float = 0.05,
                 cache_dtype=None, long_lane: bool | None = None,
                 warm_up: Sequence[str] = (), warm_up_tokens: int | None = None,
                 call_log: str | None = None, log=print) -> Server:
    """The engine (started) and app over a new session of ``model`` with ``rows`` trajectories of
    ``capacity`` tokens. Served model names: the role adapters and ``served_name`` (default the
    model config's name) for the bare base model. ``warm_up``: sampling kinds
    (``generate.SAMPLING_KINDS``) whose programs are all compiled before the engine starts (see
    ``Session.warm_up``) for calls making up to ``warm_up_tokens`` tokens (default
    ``block_tokens``; with ``block_tokens`` 0 the smallest output buffer), so no request waits on
    a compile; ``log`` (None: quiet) reports it. ``call_log``: see ``scheduler.Engine``."""
    agents = tuple(model.lora.agents) if model.lora is not None else ()
    base_name = served_name or model.config.name
    if base_name in agents:
        raise ValueError(f"the base model's served name {base_name!r} is also a role adapter's "
                         f"name (roles: {agents}); choose another with served_name")
    if min_new_bucket is None:
        min_new_bucket = max(block_tokens, 8) if block_tokens else 64
    session = model.session(mode, batch=rows, capacity=capacity, prefill_chunk=prefill_chunk,
                            min_chunk_bucket=min_chunk_bucket, min_new_bucket=min_new_bucket,
                            seed=seed, cache_dtype=cache_dtype, long_lane=long_lane)
    if warm_up:
        warm_up_session(session, warm_up, max_new_tokens=warm_up_tokens or block_tokens, log=log)
    context = ServingContext(tokenizer=model.tokenizer,
                             models={**{a: a for a in agents}, base_name: None},
                             base_name=base_name, vocab_size=model.config.vocab_size,
                             capacity=capacity, completion_max_tokens=completion_max_tokens,
                             chat_max_tokens=chat_max_tokens)
    engine = Engine(session, block_tokens=block_tokens, stream_first_token=stream_first_token,
                    schedule=schedule, max_waiting=max_waiting, batch_wait=batch_wait,
                    row_grace=row_grace, call_log=call_log).start()
    return Server(model=model, engine=engine, context=context, app=create_app(engine, context))


def warm_up_session(session, sampling: Sequence[str], *, max_new_tokens: int,
                    log=print) -> dict:
    """Compile every program the engine's calls may run for the given sampling kinds, with each
    output buffer up to ``max_new_tokens`` (0: the smallest only). Returns the count and the
    seconds taken."""
    say = log or (lambda *a, **k: None)
    lengths = range(1, max_new_tokens + 1) if max_new_tokens else ()
    count = len(session.turn_programs(lengths, sampling))
    say(f"warm-up: compiling {count} turn programs ({', '.join(dict.fromkeys(sampling))}) ...",
        flush=True)

    def progress(i, n, shape, seconds):
        lane = f", long lane of {shape.long_rows} per step" if shape.long_rows else ""
        say(f"  [{i}/{n}] chunk {shape.chunk_bucket}{lane}, {shape.max_new_bucket} new, "
            f"{shape.sampling}: {seconds:.1f} s", flush=True)

    t0 = time.perf_counter()
    done = session.warm_up(lengths, sampling, progress=progress)
    seconds = time.perf_counter() - t0
    say(f"warm-up: {len(done)} programs in {seconds:.1f} s", flush=True)
    return {"programs": len(done), "seconds": seconds}


class ServerThread:
    """Uvicorn serving ``app`` on ``host``:``port`` (0: a free port, see ``.port``) in a daemon
    thread. ``with ServerThread(app) as t: ... t.url``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off",
                                                    timeout_keep_alive=30))
        self._thread = threading.Thread(target=self.server.run,
                                        kwargs={"sockets": [self._socket]}, daemon=True,
                                        name="lragent-http")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.01)
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
