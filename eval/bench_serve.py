"""What the HTTP layer costs: ReAct-shaped 3-role episodes driven by concurrent HTTP clients against
``python -m lragent_jax.serve``, and the same episodes through the in-process rollout engine.

    python -m eval.bench_serve --random-weights llama3_1_8b --length 16384 --episodes 16 \\
        --clients 8 --modes base_lowrank_shared                      # GPU, about 3 minutes a mode
    python -m eval.bench_serve --random-weights tiny --length 256 --episodes 8 --clients 4  # CPU

Workload: the trace replay of ``eval.throughput`` (``eval.traces.generate_trace``, one seed per
episode): a random prompt, then per turn (plan / action / reflect) ``append`` random tokens and
exactly ``generate`` greedy tokens, on random weights of a preset shape with random role adapters.

- HTTP: a server subprocess (``--rows`` rows, default ``--clients``); ``--clients`` asyncio clients,
  each running episodes one after another over one keep-alive connection, every turn one streamed
  ``/v1/completions`` request whose prompt is the episode's token ids so far, pinned to the
  episode (``trajectory``) and released at its end. Time to first token: from sending a request
  to its first streamed text; the turn's latency: to its last chunk. ``--client-processes N``
  spreads the clients over N processes (separate agents), else they share one event loop.
- In process: the same episodes (same seeds, same random tokens) through ``RolloutEngine`` on a
  session of the same rows and shapes (each turn's first token in a call of its own, as the
  server's streamed requests), measured as ``eval.throughput`` measures it.

Both first compile every greedy call program the episodes may run (the server's ``--warm-up``,
``Session.warm_up`` in process; ``--no-program-warm-up``: not), then run ``--warmup`` untimed
episodes: the first timed episodes' traces with other random tokens (the two processes share a
persistent compilation cache, ``--compile-cache``; the compile seconds that still fall in the
timed window are reported). Reported per mode and side:
requests (turns)/s, episodes/s, generated tokens/s, time to first token p50 / p99, turn latency
p50, tokens prefilled, and the HTTP side over the in-process side. JSON with device, versions,
date and command.

The HTTP runs come first: this process does not touch the accelerator until they are done (the
server subprocess needs its memory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from eval.traces import generate_trace

MODES = ("non_shared", "fully_shared", "base_shared", "base_lowrank_shared")
LOWEST_TOKEN = 3  # as TraceEpisode draws its random tokens
# warm-up episodes: the timed episodes' traces (their call shapes, compiled then) with other
# random tokens (nothing of them is reused by the timed episodes)
WARMUP_TOKENS = 1_000_003


# ----------------------------------------------------------------------------- HTTP client


class Connection:
    """One keep-alive HTTP/1.1 connection (no dependencies): JSON requests, streamed or not."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def open(self) -> "Connection":
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass

    async def send(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else b""
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: "
                          f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                          + data)
        await self.writer.drain()
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        status = int(line.split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    async def body(self, headers: dict):
        """The response body, piece by piece (chunked or with a length)."""
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    return
                piece = await self.reader.readexactly(size)
                await self.reader.readline()
                yield piece
        else:
            n = int(headers.get("content-length", 0))
            if n:
                yield await self.reader.readexactly(n)

    async def request(self, method: str, path: str, body: dict | None = None):
        status, headers = await self.send(method, path, body)
        data = b"".join([piece async for piece in self.body(headers)])
        return status, json.loads(data) if data else None

    async def stream(self, path: str, body: dict):
        """(seconds to the first text, seconds to the end, the text, the finish reason)."""
        t0 = time.perf_counter()
        status, headers = await self.send("POST", path, body)
        if status != 200:
            data = b"".join([piece async for piece in self.body(headers)])
            raise RuntimeError(f"HTTP {status}: {data[:500]!r}")
        first, text, finish, buffer = None, [], None, b""
        async for piece in self.body(headers):
            buffer += piece
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                payload = event.decode().removeprefix("data: ")
                if payload == "[DONE]":
                    continue
                message = json.loads(payload)
                if "error" in message:
                    raise RuntimeError(f"stream error: {message['error']}")
                choice = message["choices"][0]
                if choice["text"]:
                    if first is None:
                        first = time.perf_counter() - t0
                    text.append(choice["text"])
                finish = choice["finish_reason"] or finish
        return first, time.perf_counter() - t0, "".join(text), finish


# ----------------------------------------------------------------------------- HTTP side


def _episode_tokens(trace, seed: int, vocab: int):
    """The random prompt and per-turn appends of a trace, drawn as ``TraceEpisode`` draws them."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(LOWEST_TOKEN, vocab, trace.prompt).tolist()
    appends = [rng.integers(LOWEST_TOKEN, vocab, t.append).tolist() for t in trace.turns]
    return prompt, appends


async def _run_clients(url: str, seeds: list[int], length: int, clients: int, vocab: int,
                       tokenizer, token_offset: int = 0, generate_scale: float = 1.0) -> dict:
    """Episodes of ``generate_trace(length, seed, generate_scale=...)`` for each seed, their
    random tokens drawn from ``seed + token_offset``, by ``clients`` concurrent clients."""
    host, port = url.removeprefix("http://").split(":")
    queue = list(reversed(seeds))
    ttft, turn_s, episode_s, generated = [], [], [], {}
    errors = []

    async def client():
        conn = await Connection(host, int(port)).open()
        try:
            while queue:
                seed = queue.pop()
                trace = generate_trace(length, seed, generate_scale=generate_scale)
                history, appends = _episode_tokens(trace, seed + token_offset, vocab)
                name = f"bench-{seed + token_offset}"
                t0 = time.perf_counter()
                ids = []
                for turn, append in zip(trace.turns, appends):
                    history = history + append
                    first, total, text, finish = await conn.stream("/v1/completions", {
                        "model": turn.agent, "prompt": history, "max_tokens": turn.generate,
                        "temperature": 0, "stream": True, "trajectory": name})
                    out = tokenizer.encode(text)
                    if len(out) != turn.generate:
                        raise RuntimeError(f"trace {trace.name}: {len(out)} tokens generated, "
                                           f"expected {turn.generate} ({finish})")
                    history = history + out
                    ids.extend(out)
                    ttft.append(first)
                    turn_s.append(total)
                episode_s.append(time.perf_counter() - t0)
                generated[seed] = ids
                await conn.request("DELETE", f"/v1/trajectories/{name}")
        except Exception as e:  # reported, not raised: the other clients finish
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    t1 = time.perf_counter()
    return {"seconds": t1 - t0, "t0": t0, "t1": t1, "ttft": ttft, "turn_s": turn_s,
            "episode_s": episode_s, "generated": [generated[s] for s in seeds if s in generated],
            "by_seed": generated, "errors": errors}


def _client_process(results, barrier, *args) -> None:
    """One client process of ``run_clients``: its clients in an event loop of their own."""
    try:
        barrier.wait(120)
        results.put(asyncio.run(_run_clients(*args)))
    except BaseException as e:  # reported by the parent: a hung get would hide it
        results.put({"errors": [f"client process: {type(e).__name__}: {e}"]})


def run_clients(url: str, seeds: list[int], length: int, clients: int, vocab: int, tokenizer,
                token_offset: int = 0, processes: int = 1, generate_scale: float = 1.0) -> dict:
    """``_run_clients`` with the clients spread over ``processes`` OS processes (each its own
    event loop, seeds dealt round-robin), as separate agents would be: in one process the
    clients' JSON work is serialized. perf_counter is the system's monotonic clock on Linux, so
    the processes' start and end times compare."""
    processes = min(processes, clients)
    if processes <= 1:
        return asyncio.run(_run_clients(url, seeds, length, clients, vocab, tokenizer,
                                        token_offset, generate_scale))
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads
    results, barrier = ctx.Queue(), ctx.Barrier(processes)
    workers = [ctx.Process(target=_client_process, daemon=True, args=(
        results, barrier, url, seeds[p::processes], length,
        clients // processes + (p < clients % processes), vocab, tokenizer, token_offset,
        generate_scale))
        for p in range(processes)]
    for w in workers:
        w.start()
    parts = [results.get(timeout=7200) for _ in workers]
    for w in workers:
        w.join(30)
    errors = [e for part in parts for e in part["errors"]]
    done = [part for part in parts if "t0" in part]
    if len(done) < len(parts):
        return {"seconds": 0.0, "ttft": [], "turn_s": [], "episode_s": [], "generated": [],
                "errors": errors}
    by_seed = {seed: ids for part in done for seed, ids in part["by_seed"].items()}
    return {"seconds": max(p["t1"] for p in done) - min(p["t0"] for p in done),
            "ttft": [x for p in done for x in p["ttft"]],
            "turn_s": [x for p in done for x in p["turn_s"]],
            "episode_s": [x for p in done for x in p["episode_s"]],
            "generated": [by_seed[s] for s in seeds if s in by_seed], "errors": errors}


def _metrics(url: str) -> dict:
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _sum(metrics: dict, prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.split("{")[0] == prefix)


def _delta(before: dict, after: dict, prefix: str) -> float:
    """How much a metric grew between two /metrics reads."""
    return _sum(after, prefix) - _sum(before, prefix)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _calls_by_shape(before: dict, after: dict) -> dict:
    """The server's calls and seconds per shape (``"<rows>x<padded prefill length>"``) between two
    /metrics reads: the keys of ``eval.throughput.calls_by_shape``."""
    out = {}
    for metric, field in (("lragent_engine_calls_by_shape_total", "calls"),
                          ("lragent_engine_call_seconds_by_shape_total", "seconds")):
        for key, value in after.items():
            if key.split("{")[0] != metric:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', key))
            shape = f"{labels['rows']}x{labels['chunk_bucket']}"
            grown = value - before.get(key, 0.0)
            if grown:
                entry = out.setdefault(shape, {"calls": 0, "seconds": 0.0})
                entry[field] = int(grown) if field == "calls" else grown
    return dict(sorted(out.items(), key=lambda kv: tuple(map(int, kv[0].split("x")))))


def _round_trips(before: dict, after: dict, name: str = "lragent_client_return_seconds") -> dict:
    """Mean, p50 and p90 (upper bounds of the histogram's buckets) of the clients' round trips
    observed between two /metrics reads."""
    def count(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    n = count(f"{name}_count")
    if not n:
        return {"return_n": 0, "return_mean_s": None, "return_p50_s": None, "return_p90_s": None}
    bounds = sorted((float(k.split('le="')[1].split('"')[0]), count(k)) for k in after
                    if k.startswith(f"{name}_bucket"))

    def quantile(q):
        return next(b for b, c in bounds if c >= q * n)

    return {"return_n": int(n), "return_mean_s": count(f"{name}_sum") / n,
            "return_p50_s": quantile(0.5), "return_p90_s": quantile(0.9)}


def longest_generation(opts) -> int:
    """The most tokens one call of the episodes generates (the warm-up covers it): a turn's
    longest generation, or with ``--block-tokens`` at most a block."""
    longest = max(t.generate for i in range(opts.episodes) for t in generate_trace(
        opts.length, opts.seed + i, generate_scale=opts.generate_scale).turns)
    return min(longest, opts.block_tokens) if opts.block_tokens else longest


def start_server(opts, mode: str, log, call_log: str | None = None
                 ) -> tuple[subprocess.Popen, str, dict]:
    """The server subprocess, its URL and its warm-up (programs, seconds; empty without);
    ``call_log``: its ``--call-log`` file."""
    command = [sys.executable, "-m", "lragent_jax.serve", "--random-weights", opts.random_weights,
               "--rank", str(opts.rank), "--mode", mode, "--rows", str(opts.rows),
               "--capacity", str(opts.capacity), "--block-tokens", str(opts.block_tokens),
               "--min-new-bucket", str(opts.min_new_bucket), "--prefill-chunk",
               str(opts.prefill_chunk), "--min-chunk-bucket", str(opts.min_chunk_bucket),
               "--seed", str(opts.seed), "--dtype", opts.dtype, "--port", "0",
               "--log-level", "warning", "--compilation-cache", opts.compile_cache or "off"]
    if opts.attn:
        command += ["--attn", opts.attn]
    if call_log:
        command += ["--call-log", call_log]
    if opts.batch_wait_ms is not None:
        command += ["--batch-wait-ms", str(opts.batch_wait_ms)]
    if opts.long_lane is not None:
        command += ["--long-lane" if opts.long_lane else "--no-long-lane"]
    command += (["--warm-up", "greedy", "--warm-up-tokens", str(longest_generation(opts))]
                if opts.program_warm_up else ["--warm-up", "none"])
    log("  $ " + " ".join(command))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=_env(opts))
    deadline = time.monotonic() + opts.start_timeout
    url, warm_up = None, {}
    while url is None:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the server exited ({process.wait()}) before serving")
        log("  | " + line.rstrip())
        match = re.search(r"on (http://[\d.]+:\d+)/v1", line)
        if match:
            url = match.group(1)
        match = re.match(r"warm-up: (\d+) programs in ([\d.]+) s", line)
        if match:
            warm_up = {"warm_up_programs": int(match.group(1)),
                       "warm_up_s": float(match.group(2))}
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not start within {opts.start_timeout} s")
    def drain():  # keep reading: a full pipe would stop the server at its next print
        for line in process.stdout:
            log("  | " + line.rstrip())

    threading.Thread(target=drain, daemon=True).start()
    import urllib.request

    while True:  # the socket is bound before uvicorn accepts: wait for /health
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not answer /health")
            time.sleep(0.2)
    return process, url, warm_up


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _read_calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_http(opts, mode: str, tokenizer, log) -> dict:
    scratch = tempfile.TemporaryDirectory(prefix="lragent-bench-serve-")
    call_log = Path(scratch.name) / "calls.jsonl"
    process, url, warm_up = start_server(opts, mode, log, str(call_log))
    try:
        vocab = tokenizer.vocab_size
        if opts.warmup:
            warm = run_clients(url, [opts.seed + i for i in range(opts.warmup)], opts.length,
                               min(opts.clients, opts.warmup), vocab, tokenizer,
                               token_offset=WARMUP_TOKENS, processes=opts.client_processes,
                               generate_scale=opts.generate_scale)
            if warm["errors"]:
                raise RuntimeError(f"warm-up failed: {warm['errors'][:3]}")
        before = _metrics(url)
        first = len(_read_calls(call_log))
        run = run_clients(url, [opts.seed + i for i in range(opts.episodes)], opts.length,
                          opts.clients, vocab, tokenizer, processes=opts.client_processes,
                          generate_scale=opts.generate_scale)
        after = _metrics(url)
        calls = _read_calls(call_log)[first:]
    finally:
        stop_server(process)
        scratch.cleanup()
    from eval.throughput import call_summary  # (importing jax claims no device)

    turns = len(run["ttft"])
    generated = sum(map(len, run["generated"]))
    return {
        "side": "http", "mode": mode, "rows": opts.rows, "clients": opts.clients,
        "client_processes": min(opts.client_processes, opts.clients),
        "episodes": len(run["episode_s"]), "failed": opts.episodes - len(run["episode_s"]),
        "errors": run["errors"][:5], "seconds": run["seconds"],
        "requests_s": turns / run["seconds"], "episodes_s": len(run["episode_s"]) / run["seconds"],
        "gen_tok_s": generated / run["seconds"], "turns": turns,
        "ttft_p50_s": _pct(run["ttft"], 50), "ttft_p99_s": _pct(run["ttft"], 99),
        "turn_p50_s": _pct(run["turn_s"], 50),
        "prefilled_total": _delta(before, after, "lragent_prefilled_tokens_total"),
        "cached_total": _delta(before, after, "lragent_cached_prompt_tokens_total"),
        "calls": _delta(before, after, "lragent_engine_calls_total"),
        "call_s": _delta(before, after, "lragent_engine_call_seconds_total"),
        "prefill_efficiency": _ratio(_delta(before, after, "lragent_prefilled_tokens_total"),
                                     _delta(before, after, "lragent_engine_prefill_slots_total")),
        "evictions": _delta(before, after, "lragent_evictions_total"),
        "compile_s_in_timed": _delta(before, after, "lragent_compile_seconds"),
        # the clients' round trips between turns and what the engine waited for them
        **_round_trips(before, after),
        "gather_s": _delta(before, after, "lragent_engine_gather_seconds_total"),
        "gather_short": _delta(before, after, "lragent_engine_gather_short_total"),
        "calls_by_shape": _calls_by_shape(before, after), **warm_up,
        "call_summary": call_summary(calls), "call_log": calls,
        "_generated": run["generated"],
    }


# ----------------------------------------------------------------------------- in process


def run_engine(opts, mode: str, weights, log) -> dict:
    from eval.common import NullTokenizer
    from eval.throughput import measure
    from lragent_jax.rollout import Schedule, TraceEpisode
    from lragent_jax.session import Session

    config, params, lora, adapters = weights
    session = Session(config, params, NullTokenizer(), adapters=adapters, lora=lora, mode=mode,
                      batch=opts.rows, capacity=opts.capacity, attn_impl=opts.attn,
                      prefill_chunk=opts.prefill_chunk, seed=opts.seed,
                      min_chunk_bucket=opts.min_chunk_bucket, min_new_bucket=opts.min_new_bucket,
                      long_lane=opts.long_lane)
    kept: dict[int, list] = {}

    class Kept(TraceEpisode):
        def record(self):
            out = super().record()
            kept[self.seed] = out["generated_ids"]
            return out

    def make(start, count):  # measure() warms up with start=10_000: the same traces' shapes
        return (Kept(generate_trace(opts.length, opts.seed + start % 10_000 + i,
                                    generate_scale=opts.generate_scale),
                     seed=opts.seed + i + (WARMUP_TOKENS if start else 0),
                     block_tokens=opts.block_tokens)
                for i in range(count))

    warm_up = {}
    if opts.program_warm_up:  # as the server does before serving
        t0 = time.perf_counter()
        done = session.warm_up(range(1, longest_generation(opts) + 1), ("greedy",))
        warm_up = {"warm_up_programs": len(done), "warm_up_s": time.perf_counter() - t0}
        log(f"  warm-up: {len(done)} programs in {warm_up['warm_up_s']:.1f} s")
    row = measure(session, make, episodes=opts.episodes, warmup=opts.warmup, schedule=Schedule(),
                  label=f"engine {mode} x{opts.rows}", progress=False, keep_calls=True)
    return {"side": "engine", "mode": mode, "rows": opts.rows, "clients": opts.rows,
            "episodes": row["episodes"], "failed": row["failed"], "errors": row["errors"],
            "seconds": row["seconds"], "requests_s": row["turns"] / row["seconds"],
            "episodes_s": row["episodes_s"], "gen_tok_s": row["gen_tok_s"], "turns": row["turns"],
            "ttft_p50_s": row["ttft_p50_s"], "ttft_p99_s": row["ttft_p99_s"],
            "turn_p50_s": row["turn_p50_s"], "prefilled_total": row["prefilled_total"],
            "calls": row["calls"], "prefill_efficiency": row["prefill_efficiency"],
            "compile_s_in_timed": row["compile_s_in_timed"],
            "calls_by_shape": row["calls_by_shape"], **warm_up,
            "call_summary": row["call_summary"], "call_log": row["call_log"],
            "_generated": [kept[opts.seed + i] for i in range(opts.episodes)
                           if opts.seed + i in kept]}


# ----------------------------------------------------------------------------- driver


def _pct(values, q):
    return float(np.percentile(values, q)) if len(values) else None


def _env(opts) -> dict:
    env = dict(os.environ)
    if opts.compile_cache:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", opts.compile_cache)
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    return env


def compare(rows: list[dict]) -> list[dict]:
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        http = next((r for r in rows if r["mode"] == mode and r["side"] == "http"), None)
        engine = next((r for r in rows if r["mode"] == mode and r["side"] == "engine"), None)
        if not http or not engine or not engine["requests_s"]:
            continue
        same = sum(a == b for a, b in zip(http["_generated"], engine["_generated"]))
        both = min(len(http["_generated"]), len(engine["_generated"]))
        out.append({"mode": mode, "http_vs_engine_requests_s": http["requests_s"]
                    / engine["requests_s"],
                    "http_cost": 1 - http["requests_s"] / engine["requests_s"],
                    "ttft_p50_http_minus_engine_s": (http["ttft_p50_s"] or 0)
                    - (engine["ttft_p50_s"] or 0),
                    "same_tokens_episodes": f"{same}/{both}"})
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.bench_serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random-weights", metavar="PRESET", default=None,
                   help="model shape (default llama3_1_8b on an accelerator, tiny on a CPU)")
    p.add_argument("--modes", default="base_lowrank_shared",
                   help=f"comma-separated from {', '.join(MODES)} (default base_lowrank_shared)")
    p.add_argument("--length", type=int, default=16384, help="episode length in tokens (>= 256)")
    p.add_argument("--episodes", type=int, default=16, help="timed episodes per mode and side")
    p.add_argument("--generate-scale", type=float, default=1.0,
                   help="multiply every turn's generated tokens (default 1: 2-48 a turn, 13 on "
                        "average at 16k; 8: about 100), for workloads of longer answers")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed episodes first (default: --clients)")
    p.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients (default 8)")
    p.add_argument("--client-processes", type=int, default=1,
                   help="spread the clients over this many processes, each its own event loop, "
                        "as separate agents would be (default 1: all in one, their JSON work "
                        "serialized)")
    p.add_argument("--rows", type=int, default=None, help="session rows (default --clients)")
    p.add_argument("--block-tokens", type=int, default=0,
                   help="tokens per call of a generation after its first, on both sides: the "
                        "server's --block-tokens and the in-process episodes' continuations "
                        "(default 0: a turn's rest in one call)")
    p.add_argument("--batch-wait-ms", type=float, default=None,
                   help="the server's --batch-wait-ms (default: its own)")
    p.add_argument("--min-new-bucket", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--min-chunk-bucket", type=int, default=16)
    p.add_argument("--long-lane", action=argparse.BooleanOptionalAction, default=None,
                   help="the long-prefill lane on both sides (Session's long_lane; default: on "
                        "when --prefill-chunk > --min-chunk-bucket)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--attn", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", default="http,engine", help="http, engine or both (default)")
    p.add_argument("--compile-cache", default=None,
                   help="persistent compilation cache shared by the server and this process "
                        "(default: a folder in the temporary directory; '' for none)")
    p.add_argument("--program-warm-up", action=argparse.BooleanOptionalAction, default=True,
                   help="both sides compile every greedy call program before their warm-up "
                        "episodes (the server's --warm-up greedy, Session.warm_up in process), "
                        "so no timed call waits on a compile (default on)")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--out", default="results/bench_serve.json")
    return p


def main(argv=None) -> int:
    """Check the options, start the server, run both sides per mode, print and save the table
    (a little over 80 lines: the steps read in the order they run)."""
    parser = build_parser()
    opts = parser.parse_args(argv)
    modes = [m for m in opts.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"--modes: unknown {bad}; allowed: {', '.join(MODES)}")
    sides = [s for s in opts.sides.split(",") if s]
    if not sides or set(sides) - {"http", "engine"}:
        parser.error(f"--sides takes http and/or engine; got {opts.sides!r}")
    if opts.length < 256:
        parser.error(f"--length must be >= 256; got {opts.length}")
    try:  # every trace the run will replay (warm-up and timed episodes share seeds)
        for i in range(max(opts.episodes, opts.warmup if opts.warmup is not None else 0,
                           opts.clients)):
            generate_trace(opts.length, opts.seed + i, generate_scale=opts.generate_scale)
    except ValueError as e:
        parser.error(f"--generate-scale: {e}")
    for name in ("episodes", "clients", "client_processes"):
        if getattr(opts, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(opts, name)}")
    opts.rows = opts.rows or opts.clients
    opts.warmup = opts.clients if opts.warmup is None else opts.warmup
    if opts.compile_cache is None:
        opts.compile_cache = str(Path(tempfile.gettempdir()) / "lragent-bench-serve-jax-cache")
    for key, value in _env(opts).items():  # this process shares the cache too
        if key.startswith("JAX_"):
            os.environ[key] = value

    from eval.throughput import trace_capacity

    opts.capacity = trace_capacity(opts.length)
    if opts.random_weights is None:
        # decided without starting a backend here: the server must get the accelerator first
        opts.random_weights = "tiny" if _cpu_only() else "llama3_1_8b"

    from lragent_jax.config import ModelConfig
    from lragent_jax.serve.server import IdTokenizer

    if opts.random_weights == "tiny":
        from eval.common import tiny_config

        vocab = tiny_config().vocab_size
    else:
        vocab = ModelConfig.preset(opts.random_weights).vocab_size
    tokenizer = IdTokenizer(vocab)
    rows = []
    print(f"bench_serve: {opts.random_weights}, {opts.length} tokens, {opts.episodes} episodes, "
          f"{opts.clients} clients, {opts.rows} rows, modes {modes}", flush=True)
    if "http" in sides:
        for mode in modes:
            print(f"\n== HTTP, {mode}", flush=True)
            rows.append(run_http(opts, mode, tokenizer, print))
            print(_line(rows[-1]), flush=True)
    if "engine" in sides:
        import jax
        import jax.numpy as jnp

        from eval.common import tiny_config
        from eval.throughput import random_model

        dtype = jnp.dtype(("float32" if jax.default_backend() == "cpu" else "bfloat16")
                          if opts.dtype == "auto" else opts.dtype)
        shape = tiny_config() if opts.random_weights == "tiny" else ModelConfig.preset(
            opts.random_weights)
        weights = random_model(shape, rank=opts.rank, dtype=dtype, seed=opts.seed)
        for mode in modes:
            print(f"\n== in process, {mode}", flush=True)
            rows.append(run_engine(opts, mode, weights, print))
            print(_line(rows[-1]), flush=True)

    from eval.common import environment, print_table, write_json

    env = environment()
    summary = compare(rows)
    print_table(rows, ["side", "mode", "rows", "clients", "episodes", "requests_s", "episodes_s",
                       "gen_tok_s", "ttft_p50_s", "ttft_p99_s", "turn_p50_s", "prefilled_total",
                       "calls", "prefill_efficiency", "warm_up_s", "compile_s_in_timed",
                       "failed"],
                title=f"serving {opts.random_weights} at {opts.length} tokens on {env['device']} "
                      f"(jax {env['jax']}, {env['date']})")
    http = [r for r in rows if r["side"] == "http"]
    if http:
        print_table(http, ["mode", "calls", "call_s", "seconds", "return_n", "return_mean_s",
                           "return_p50_s", "return_p90_s", "gather_s", "gather_short"],
                    title="HTTP side: seconds in calls of the wall time; the clients' round trips "
                          "between turns (p50 / p90: histogram bucket bounds) and the engine's "
                          "waits for them (short: calls that started with a client missing)")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        shapes = shape_table([r for r in rows if r["mode"] == mode])
        if shapes:
            print_table(shapes, ["shape", "http_calls", "http_s", "engine_calls", "engine_s"],
                        title=f"{mode}: calls per shape (rows in the call x padded prefill "
                              "length) and their seconds, HTTP side and in process")
    made_up = [{"side": r["side"], "mode": r["mode"], "calls": r["calls"], **r["call_summary"]}
               for r in rows if r.get("call_summary")]
    if made_up:
        print_table(made_up, ["side", "mode", "calls", "decode_steps", "long_calls",
                              "long_chunks", "long_call_s", "other_call_s"],
                    title="how the calls were made up: decode steps in all (a call decodes until "
                          "its last row is done), calls with a chunk over 512 tokens, those "
                          "chunks, seconds in those calls and in the others")
    if summary:
        print_table(summary, ["mode", "http_vs_engine_requests_s", "http_cost",
                              "ttft_p50_http_minus_engine_s", "same_tokens_episodes"],
                    title="HTTP over in-process (requests/s ratio; cost = 1 - ratio)")
    payload = {"environment": env, "args": vars(opts),
               "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
               "summary": summary}
    write_json(opts.out, payload)
    print(f"wrote {opts.out}")
    return 0


def shape_table(rows: list[dict]) -> list[dict]:
    """One line per call shape seen on either side of one mode: calls and seconds per side."""
    by_side = {r["side"]: r.get("calls_by_shape") or {} for r in rows}
    shapes = sorted({k for v in by_side.values() for k in v},
                    key=lambda k: tuple(map(int, k.split("x"))))
    out = []
    for shape in shapes:
        line = {"shape": shape}
        for side in ("http", "engine"):
            entry = by_side.get(side, {}).get(shape, {})
            line[f"{side}_calls"] = entry.get("calls", 0)
            line[f"{side}_s"] = round(entry.get("seconds", 0.0), 3)
        out.append(line)
    return out


def _line(row) -> str:
    return (f"  {row['side']} {row['mode']}: {row['requests_s']:.2f} requests/s, "
            f"{row['episodes_s']:.3f} episodes/s, TTFT p50 {row['ttft_p50_s'] or 0:.3f} s "
            f"p99 {row['ttft_p99_s'] or 0:.3f} s, {row['failed']} failed"
            + (f" ({row['errors'][:2]})" if row.get("errors") else ""))


def _cpu_only() -> bool:
    """Whether JAX would run on the CPU, asked in a subprocess (this one must not claim the
    accelerator before the server does)."""
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "cpu"


if __name__ == "__main__":
    sys.exit(main())
