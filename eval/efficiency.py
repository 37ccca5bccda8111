"""Trace-replay efficiency benchmark of the cache-sharing modes.

    python -m eval.efficiency --model smollm2_135m --lengths 256,1024,4096
    python -m eval.efficiency --model llama3_1_8b --lengths 2048,8192,16384 --attn reference

Each trace (an episode's turns: agent, tokens appended, tokens generated) is replayed on one
trajectory per mode with random weights of the model's real shapes and random role adapters. Per mode
and length: end-to-end time of the episode, time to first token of every turn (the turn's prefill
and first sampled token, timed as its own jitted call), generated tokens/s, tokens each agent
prefilled, cache bytes (measured and analytic) and device memory in use.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from eval.common import (NullTokenizer, environment, positive_int_list, print_table,
                         write_json)
from eval.floors import measure_ceilings
from eval.traces import Trace, generate_trace, load_traces
from lragent_jax.cache import ALL_MODES, ShareMode
from lragent_jax.config import ADAPTER_TARGETS, LoraConfig, ModelConfig
from lragent_jax.inference import fuse_adapters, to_inference_params
from lragent_jax.lora import init_adapters
from lragent_jax.model import init_params
from lragent_jax.session import GenerationSettings, Session, Turn


def _device_memory() -> dict:
    stats = jax.local_devices()[0].memory_stats() or {}
    return {k: stats[k] for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


def replay(session: Session, trace: Trace, rng: np.random.Generator) -> dict:
    """Replay ``trace`` on row 0 of ``session``; returns timings and per-agent prefill counts."""
    vocab = session.config.vocab_size
    session.reset([0])
    session.append_tokens(0, rng.integers(3, vocab, trace.prompt).tolist())
    before = session.prefilled[0].copy()
    ttft, turn_s = [], []
    t_start = time.perf_counter()
    for turn in trace.turns:
        ids = tuple(int(t) for t in rng.integers(3, vocab, turn.append))
        t0 = time.perf_counter()
        session.turn({0: Turn(turn.agent, append_ids=ids,
                              settings=GenerationSettings(max_new_tokens=1))})
        jax.block_until_ready(session.cache)
        t1 = time.perf_counter()
        if turn.generate > 1:
            session.turn({0: Turn(turn.agent, settings=GenerationSettings(
                max_new_tokens=turn.generate - 1))})
            jax.block_until_ready(session.cache)
        ttft.append(t1 - t0)
        turn_s.append(time.perf_counter() - t0)
    e2e = time.perf_counter() - t_start
    prefilled = session.prefilled[0] - before
    return {"e2e_s": e2e, "ttft_s": ttft, "turn_s": turn_s,
            "prefilled": {name: int(prefilled[i]) for i, name in enumerate(session.agent_names)}}


def _median_runs(runs: list[dict]) -> dict:
    out = {"e2e_s": statistics.median(r["e2e_s"] for r in runs),
           "ttft_s": [statistics.median(v) for v in zip(*(r["ttft_s"] for r in runs))],
           "turn_s": [statistics.median(v) for v in zip(*(r["turn_s"] for r in runs))],
           "prefilled": runs[0]["prefilled"], "repeats": len(runs)}
    return out


def benchmark(config: ModelConfig, traces: list[Trace], *, modes=ALL_MODES, attn_impl=None,
              rank: int = 8, targets=("q", "v"), dtype=jnp.bfloat16, repeats: int = 3,
              prefill_chunk: int = 2048, seed: int = 0, min_chunk_bucket: int = 64, log=print,
              on_row=None) -> list[dict]:
    """Replay every trace in every mode; ``on_row(rows)`` is called after each finished row (the
    CLI saves partial results there, so a run cut by a time limit keeps what it measured)."""
    config = config.replace(eos_token_ids=())
    params = to_inference_params(
        jax.jit(init_params, static_argnums=(1, 2))(jax.random.key(seed), config, dtype), config,
        donate=True)
    agents = sorted({t.agent for trace in traces for t in trace.turns},
                    key=lambda a: ("plan", "action", "reflect").index(a)
                    if a in ("plan", "action", "reflect") else 9)
    lora = LoraConfig(rank=rank, targets=tuple(targets), agents=tuple(agents))
    adapters = init_adapters(jax.random.key(seed + 1), config, lora, dtype=dtype, b_scale=0.02)
    params = fuse_adapters(params, config, adapters, lora, donate=True)  # shared by every mode
    rows = []
    for trace in traces:
        capacity = -(-(trace.total + 64) // 256) * 256
        for mode in modes:
            mode = ShareMode.parse(mode)
            session = Session(config, params, NullTokenizer(), adapters=adapters, lora=lora,
                              mode=mode, batch=1, capacity=capacity, attn_impl=attn_impl,
                              prefill_chunk=prefill_chunk, seed=seed,
                              min_chunk_bucket=min(min_chunk_bucket, capacity),
                              min_new_bucket=64)
            rng = np.random.default_rng(seed)
            replay(session, trace, rng)  # compile every bucket of this trace
            runs = [replay(session, trace, np.random.default_rng(seed + 1 + i))
                    for i in range(repeats)]
            m = _median_runs(runs)
            agent_turns = [i for i, t in enumerate(trace.turns)]
            first_turn_of = {}
            for i in agent_turns:
                first_turn_of.setdefault(trace.turns[i].agent, i)
            row = {
                "model": config.name, "trace": trace.name, "length": trace.total,
                "mode": mode.value, "attn": attn_impl or "default",
                "e2e_s": m["e2e_s"], "gen_tok_s": trace.generated / m["e2e_s"],
                "tokens_s": trace.total / m["e2e_s"],
                "ttft_s": m["ttft_s"], "turn_s": m["turn_s"],
                "ttft_first_turn_of": {a: m["ttft_s"][i] for a, i in first_turn_of.items()},
                "ttft_mean_s": float(np.mean(m["ttft_s"])),
                "prefilled": m["prefilled"], "prefilled_total": sum(m["prefilled"].values()),
                "cache_bytes": session.cache_bytes()["total"],
                "cache_bytes_analytic": session.analytic_cache_bytes()["total"],
                **{f"device_{k}": v for k, v in _device_memory().items()},
                "repeats": m["repeats"],
            }
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            log(f"  {config.name} {trace.name} {mode.value}: e2e {row['e2e_s']:.3f}s, "
                f"prefilled {row['prefilled_total']}, cache {row['cache_bytes'] / 1e6:.1f} MB")
            del session
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Ratios against fully shared and non-shared at each (model, length)."""
    out = []
    for key in sorted({(r["model"], r["length"], r["attn"]) for r in rows}):
        group = {r["mode"]: r for r in rows if (r["model"], r["length"], r["attn"]) == key}
        lr = group.get("base_lowrank_shared")
        summary = {"model": key[0], "length": key[1], "attn": key[2]}
        if lr:
            for other in ("fully_shared", "non_shared", "base_shared"):
                if other in group:
                    summary[f"speed_vs_{other}"] = group[other]["e2e_s"] / lr["e2e_s"]
            if "non_shared" in group:
                summary["memory_vs_non_shared"] = lr["cache_bytes"] / group["non_shared"]["cache_bytes"]
        out.append(summary)
    return out



def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.efficiency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m", help="model preset (random weights)")
    p.add_argument("--lengths", type=positive_int_list, default=[256, 1024, 4096],
                   help="total trace lengths in tokens, e.g. 256,2048,16384")
    p.add_argument("--trace-file", help="replay traces from this JSON file instead of generating")
    p.add_argument("--modes", default=",".join(m.value for m in ALL_MODES),
                   help="comma-separated share modes")
    p.add_argument("--attn", default=None, help="attention implementation (reference, triton, ...)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q,v", help=f"adapter targets from {ADAPTER_TARGETS}")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-floors", action="store_true", help="skip measuring the ceilings")
    p.add_argument("--out", default="results/efficiency.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = ModelConfig.preset(args.model)
    traces = (load_traces(args.trace_file) if args.trace_file
              else [generate_trace(n, args.seed) for n in args.lengths])
    env = environment()
    ceilings = None if args.no_floors else measure_ceilings(small=jax.default_backend() == "cpu")

    def save(rows, partial=True):
        return write_json(args.out, {"environment": env, "args": vars(args), "rows": rows,
                                     "ceilings": ceilings, "summary": summarize(rows),
                                     "partial": partial})

    rows = benchmark(config, traces, modes=args.modes.split(","), attn_impl=args.attn,
                     rank=args.rank, targets=args.targets.split(","),
                     dtype=jnp.dtype(args.dtype), repeats=args.repeats,
                     prefill_chunk=args.prefill_chunk, seed=args.seed, on_row=save)
    print_table(rows, ["model", "length", "mode", "attn", "e2e_s", "gen_tok_s", "ttft_mean_s",
                       "prefilled_total", "cache_bytes"],
                title=f"trace replay on {env['device']} (jax {env['jax']}, {env['date']})")
    summary = summarize(rows)
    print_table(summary, ["model", "length", "attn", "speed_vs_fully_shared",
                          "speed_vs_non_shared", "speed_vs_base_shared", "memory_vs_non_shared"],
                title="base_lowrank_shared relative to the other modes (time ratio: >1 is faster)")
    print(f"wrote {save(rows, partial=False)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
