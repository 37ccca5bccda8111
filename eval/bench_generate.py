"""Prefill and decode speed of single-agent generation, next to the weight-bandwidth floor.

    python -m eval.bench_generate --model smollm2_135m --batch 1,16 --prompt 512 --new 128
    python -m eval.bench_generate --model llama3_1_8b --batch 1 --prompt 2048 --new 64

Random weights of the preset's real shapes (speed does not depend on the values). Prefill tokens/s =
batch x prompt / prefill time; decode step = (time of prefill + N tokens - time of prefill + 1 token)
/ (N - 1), each timed as one jitted turn; the floor of a decode step is the bytes of the weights
over the measured copy bandwidth (a decode step must read every weight once).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from eval.common import (NullTokenizer, environment, measure_copy_bandwidth, print_table,
                         time_call, write_json)
from lragent_jax.config import ModelConfig
from lragent_jax.model import init_params
from lragent_jax.session import GenerationSettings, Session, Turn


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.bench_generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m",
                   help="model preset (random weights of its shapes); default smollm2_135m")
    p.add_argument("--batch", type=_int_list, default=[1, 16], help="batch sizes, e.g. 1,16")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per row (default 512)")
    p.add_argument("--new", type=int, default=64, help="decoded tokens per row (default 64)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--attn", default=None,
                   help="attention implementation: reference, triton, mosaic_tpu (default: best)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill step")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the copy-bandwidth probe")
    p.add_argument("--unroll", type=int, default=1, help="layers per scan iteration (default 1)")
    p.add_argument("--out", default="results/bench_generate.json", help="JSON output path")
    args = p.parse_args(argv)
    if args.new < 2:
        p.error("--new must be >= 2")
    return args


def run(args) -> dict:
    config = ModelConfig.preset(args.model).replace(eos_token_ids=())
    dtype = jnp.dtype(args.dtype)
    params = jax.jit(init_params, static_argnums=(1, 2))(jax.random.key(0), config, dtype)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    bandwidth = None if args.no_bandwidth else measure_copy_bandwidth()
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch:
        capacity = args.prompt + args.new + 8
        session = Session(config, params, NullTokenizer(), mode="non_shared", batch=batch,
                          capacity=capacity, attn_impl=args.attn,
                          prefill_chunk=min(args.prefill_chunk, 1 << (args.prompt - 1).bit_length()),
                          scan_unroll=args.unroll)
        prompts = rng.integers(3, config.vocab_size, (batch, args.prompt))

        def turn(n_new):
            session.reset()
            return session.turn({row: Turn(None, append_ids=tuple(int(t) for t in prompts[row]),
                                           settings=GenerationSettings(max_new_tokens=n_new))
                                 for row in range(batch)})

        t_first = time_call(lambda: turn(1) and session.cache, repeats=args.repeats)["median_s"]
        t_all = time_call(lambda: turn(args.new) and session.cache,
                          repeats=args.repeats)["median_s"]
        step = (t_all - t_first) / (args.new - 1)
        row = {
            "model": args.model, "batch": batch, "prompt": args.prompt, "new": args.new,
            "unroll": args.unroll,
            "prefill_s": t_first, "prefill_tok_s": batch * args.prompt / t_first,
            "decode_step_ms": step * 1e3, "decode_tok_s": batch / step,
        }
        if bandwidth:
            floor = weight_bytes / bandwidth
            row["floor_step_ms"] = floor * 1e3
            row["step_over_floor"] = step / floor
        rows.append(row)
    return {"environment": environment(), "args": vars(args), "weight_bytes": weight_bytes,
            "copy_bandwidth_Bps": bandwidth, "rows": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    env = result["environment"]
    print_table(result["rows"], ["model", "batch", "prompt", "new", "prefill_s", "prefill_tok_s",
                                 "decode_step_ms", "decode_tok_s", "floor_step_ms",
                                 "step_over_floor"],
                title=f"generation speed on {env['device']} (jax {env['jax']}, {env['date']})")
    if result["copy_bandwidth_Bps"]:
        print(f"weights {result['weight_bytes'] / 1e9:.3f} GB, measured copy bandwidth "
              f"{result['copy_bandwidth_Bps'] / 1e12:.3f} TB/s")
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
