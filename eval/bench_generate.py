"""Decode and prefill speed of generation at a given cache length, next to the machine's floors.

    python -m eval.bench_generate --model llama3_1_8b --batch 1 --context 2048,16384,32768 \\
        --adapters none,lora
    python -m eval.bench_generate --model smollm2_135m --batch 1,16 --context 512

Random weights of the preset's real shapes (speed does not depend on the values), in the per-layer
inference layout. Per (batch, context, adapters): the context is prefilled once (timed: prefill
tokens/s); then the decode step = (time of a turn appending 1 token and decoding N - time of the
same turn decoding 1) / (N - 1), the row cut back to the context before each timed turn, so every
step attends over ``context`` keys. ``--adapters lora``: rank-8 role adapters on
q, v, o, gate, up, down in base_lowrank_shared mode (every row the same agent); ``none``: the bare
model. The floor of a step is the bytes it must read (every weight once, plus each row's K, V and
low-rank entries of the context) over the read bandwidth measured in the same run; the prefill
floor is its matmul FLOPs over the measured bf16 matmul rate. Results are saved after every row.
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
from eval.floors import decode_step_bytes, measure_ceilings, weight_bytes
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.inference import fuse_adapters, to_inference_params
from lragent_jax.lora import init_adapters
from lragent_jax.model import init_params
from lragent_jax.session import GenerationSettings, Session, Turn

ADAPTER_TARGETS = ("q", "v", "o", "gate", "up", "down")



def _adapter_list(text: str) -> list[str]:
    values = [v for v in text.split(",") if v]
    bad = [v for v in values if v not in ("none", "lora")]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"expected a list of none, lora; got {text!r}")
    return values


def _case_list(text: str) -> list[tuple[int, int, str]]:
    cases = []
    for item in (v for v in text.split(",") if v):
        parts = item.split(":")
        try:
            batch, context, kind = int(parts[0]), int(parts[1]), parts[2]
        except (IndexError, ValueError):
            raise argparse.ArgumentTypeError(f"expected BATCH:CONTEXT:none|lora; got {item!r}")
        if batch < 1 or context < 1 or kind not in ("none", "lora") or len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected BATCH:CONTEXT:none|lora with positive "
                                             f"numbers; got {item!r}")
        cases.append((batch, context, kind))
    if not cases:
        raise argparse.ArgumentTypeError("--cases is empty")
    return cases


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.bench_generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m",
                   help="model preset (random weights of its shapes); default smollm2_135m")
    p.add_argument("--batch", type=positive_int_list, default=[1, 16],
                   help="batch sizes, e.g. 1,16")
    p.add_argument("--context", type=positive_int_list, default=[512],
                   help="cache lengths each decode step attends over, e.g. 2048,16384")
    p.add_argument("--new", type=int, default=64, help="decoded tokens per timed turn (>= 2)")
    p.add_argument("--adapters", type=_adapter_list, default=["none"],
                   help="none (bare model) and/or lora (rank 8, base_lowrank_shared)")
    p.add_argument("--cases", type=_case_list, default=None,
                   help="explicit BATCH:CONTEXT:ADAPTERS triples instead of the product of "
                        "--batch, --context and --adapters, e.g. 1:2048:none,16:2048:lora")
    p.add_argument("--rank", type=int, default=8, help="adapter rank with --adapters lora")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--attn", default=None,
                   help="attention implementation (default: chosen per call shape)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill step")
    p.add_argument("--decode-block", type=positive_int_list, default=None,
                   help="decode steps per stop check (default: the session's default); a list "
                        "times each")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    p.add_argument("--no-floors", action="store_true", help="skip measuring the ceilings")
    p.add_argument("--out", default="results/bench_generate.json", help="JSON output path")
    args = p.parse_args(argv)
    if args.new < 2:
        p.error(f"--new must be >= 2; got {args.new}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1; got {args.repeats}")
    if args.prefill_chunk < 1 or args.prefill_chunk & (args.prefill_chunk - 1):
        p.error(f"--prefill-chunk must be a power of two; got {args.prefill_chunk}")
    return args


def _median_time(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(session: Session, context: int, new: int, repeats: int, agent, rng) -> dict:
    """Prefill ``context`` tokens in every row once, then time decode turns over that context."""
    config, batch = session.config, session.batch
    session.reset()
    prompts = rng.integers(3, config.vocab_size, (batch, context))
    one = GenerationSettings(max_new_tokens=1)
    t0 = time.perf_counter()
    session.turn({r: Turn(agent, append_ids=tuple(int(t) for t in prompts[r]), settings=one)
                  for r in range(batch)})
    jax.block_until_ready(session.cache)
    prefill_first = time.perf_counter() - t0  # includes compilation

    def decode(n):
        def run():
            for r in range(batch):
                session.truncate(r, context)
            session.turn({r: Turn(agent, append_ids=(int(prompts[r, -1]),),
                                  settings=GenerationSettings(max_new_tokens=n))
                          for r in range(batch)})
            jax.block_until_ready(session.cache)
        return run

    t_one = _median_time(decode(1), repeats)
    t_all = _median_time(decode(new), repeats)

    def prefill():
        session.reset()
        session.turn({r: Turn(agent, append_ids=tuple(int(t) for t in prompts[r]), settings=one)
                      for r in range(batch)})
        jax.block_until_ready(session.cache)

    t_prefill = _median_time(prefill, max(1, min(repeats, 3)))
    return {"prefill_s": t_prefill, "prefill_first_call_s": prefill_first,
            "decode_step_s": (t_all - t_one) / (new - 1), "turn_1_token_s": t_one}


def prefill_flops(params, config, batch: int, context: int) -> float:
    """Matmul FLOPs of prefilling ``context`` tokens per row: 2 per layer weight per token, the
    causal attention (4·N·H per query-key pair, half the pairs), one output-head row."""
    layer_weights = sum(x.size for x in jax.tree.leaves(params["layers"]))
    attention = 2 * config.num_heads * config.head_dim * context * context * config.num_layers
    head = 2 * config.hidden_size * config.vocab_size
    return batch * (2 * context * layer_weights + attention + head)


def run(args) -> dict:
    config = ModelConfig.preset(args.model).replace(eos_token_ids=())
    dtype = jnp.dtype(args.dtype)
    params = to_inference_params(
        jax.jit(init_params, static_argnums=(1, 2))(jax.random.key(0), config, dtype), config,
        donate=True)
    ceilings = None if args.no_floors else measure_ceilings(small=jax.default_backend() == "cpu")
    rng = np.random.default_rng(0)
    result = {"environment": environment(), "args": vars(args), "weight_bytes": weight_bytes(params),
              "ceilings": ceilings, "rows": []}
    lora = LoraConfig(rank=args.rank, targets=ADAPTER_TARGETS)
    adapters = init_adapters(jax.random.key(1), config, lora, dtype=dtype, b_scale=0.02)
    cases = args.cases or [(b, c, k) for k in args.adapters for b in args.batch
                           for c in args.context]
    # one copy of the weights with the adapters' A appended, shared by every adapter row
    fused = (fuse_adapters(params, config, adapters, lora) if any(k == "lora" for *_, k in cases)
             else None)
    for batch, context, kind in cases:
        for block in (args.decode_block or [None]):
            capacity = -(-(context + args.new + 8) // 256) * 256
            extra = {} if kind == "none" else {"adapters": adapters, "lora": lora}
            session = Session(config, params if kind == "none" else fused,
                              NullTokenizer(),
                              mode="base_lowrank_shared" if kind == "lora" else "non_shared",
                              batch=batch, capacity=capacity, attn_impl=args.attn,
                              prefill_chunk=min(args.prefill_chunk,
                                                1 << (context - 1).bit_length()),
                              min_new_bucket=64, decode_block=block, **extra)
            m = measure(session, context, args.new, args.repeats,
                        "plan" if kind == "lora" else None, rng)
            step = m["decode_step_s"]
            row = {"model": args.model, "adapters": kind, "batch": batch,
                   "context": context, "decode_block": session.decode_block,
                   "prefill_s": m["prefill_s"],
                   "prefill_tok_s": batch * context / m["prefill_s"],
                   "decode_step_ms": step * 1e3, "decode_tok_s": batch / step,
                   "prefill_first_call_s": m["prefill_first_call_s"]}
            if ceilings:
                need = decode_step_bytes(params, config, batch=batch, context=context,
                                         cache_dtype=session.spec.dtype,
                                         rank=session.spec.rank)
                floor = need / ceilings["read_Bps"]
                row.update(step_bytes=need, floor_step_ms=floor * 1e3,
                           step_over_floor=step / floor)
                flops = prefill_flops(params, config, batch, context)
                row["prefill_over_matmul_floor"] = m["prefill_s"] / (
                    flops / ceilings["matmul_bf16_flops"])
            result["rows"].append(row)
            write_json(args.out, result)
            print(f"  {kind} B={batch} ctx={context} block={session.decode_block}: "
                  f"decode {step * 1e3:.3f} ms"
                  + (f" ({row['step_over_floor']:.2f}x floor)" if ceilings else ""),
                  flush=True)
            del session
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    env = result["environment"]
    print_table(result["rows"], ["model", "adapters", "batch", "context", "decode_block",
                                 "prefill_tok_s", "decode_step_ms", "decode_tok_s",
                                 "floor_step_ms", "step_over_floor", "prefill_over_matmul_floor"],
                title=f"generation speed on {env['device']} (jax {env['jax']}, {env['date']})")
    c = result["ceilings"]
    if c:
        print(f"weights {result['weight_bytes'] / 1e9:.3f} GB; measured read {c['read_Bps'] / 1e12:.2f}"
              f" TB/s, copy {c['copy_Bps'] / 1e12:.2f} TB/s (read+write), bf16 matmul "
              f"{c['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s")
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
