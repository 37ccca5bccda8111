"""Kernels per layer in the compiled decode step, and the step time against the layer count.

    python -m eval.decode_profile --model smollm2_135m --layers 2,4 --time-layers 15,30

Compiles the jitted turn of a decode-only call (batch 1, one new token, a 64-token output buffer)
for the model with two layer counts and counts the launching instructions of the optimized HLO
(fusions, custom calls such as cuBLAS GEMMs, cuDNN and Pallas kernels, copies): the difference
over the layer difference is what one layer launches per token. Then times the decode step at
other layer counts: the slope is the time of one layer, the intercept what every step pays once
(logits, sampling, the loop). Together they say whether a step is bound by bytes or by launches.
"""

from __future__ import annotations

import argparse
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from eval.common import (NullTokenizer, environment, positive_int_list, print_table,
                         write_json)
from lragent_jax.config import ModelConfig
from lragent_jax.inference import to_inference_params
from lragent_jax.model import init_params
from lragent_jax.session import GenerationSettings, Session, Turn

LAUNCHING = re.compile(r"=\s*\S+\s+(fusion|custom-call|copy|copy-start|all-reduce|scatter|gather|"
                       r"dynamic-update-slice|sort|reduce|convolution|dot)\(")


def _session(config, layers, batch, context, dtype):
    cfg = config.replace(num_layers=layers, eos_token_ids=())
    params = to_inference_params(init_params(jax.random.key(0), cfg, dtype), cfg, donate=True)
    s = Session(cfg, params, NullTokenizer(), mode="non_shared", batch=batch,
                capacity=-(-(context + 200) // 256) * 256, min_new_bucket=64)
    rng = np.random.default_rng(0)
    for r in range(batch):
        s.append_tokens(r, rng.integers(3, cfg.vocab_size, context).tolist())
    s.turn({r: Turn(None, settings=GenerationSettings(max_new_tokens=1)) for r in range(batch)})
    return s


def count_launches(session: Session) -> dict:
    """Launching instructions of the compiled turn that decodes one token per row."""
    from lragent_jax import generate

    captured = {}
    real = generate.run_turn

    def capture(params, adapters, cache, inputs, *, shape):
        captured["hlo"] = real.lower(params, adapters, cache, inputs, shape=shape).compile() \
            .as_text()
        return real(params, adapters, cache, inputs, shape=shape)

    import lragent_jax.session as session_module

    session_module.run_turn = capture
    try:
        session.turn({r: Turn(None, append_ids=(5,), settings=GenerationSettings(max_new_tokens=2))
                      for r in range(session.batch)})
    finally:
        session_module.run_turn = real
    counts: dict[str, int] = {}
    for match in LAUNCHING.finditer(captured["hlo"]):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    counts["total"] = sum(counts.values())
    return counts


def step_time(session: Session, new: int = 64, repeats: int = 5) -> float:
    import time

    def turn(n):
        start = [len(t) for t in session.tokens]
        t0 = time.perf_counter()
        session.turn({r: Turn(None, append_ids=(7,), settings=GenerationSettings(max_new_tokens=n))
                      for r in range(session.batch)})
        jax.block_until_ready(session.cache)
        elapsed = time.perf_counter() - t0
        for r in range(session.batch):
            session.truncate(r, start[r])
        return elapsed

    turn(1), turn(new)
    ones = sorted(turn(1) for _ in range(repeats))[repeats // 2]
    alls = sorted(turn(new) for _ in range(repeats))[repeats // 2]
    return (alls - ones) / (new - 1)



def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.decode_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--layers", type=positive_int_list, default=[2, 4],
                   help="two layer counts whose compiled HLO is compared")
    p.add_argument("--time-layers", type=positive_int_list, default=[15, 30],
                   help="layer counts whose decode step is timed")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--out", default="results/decode_profile.json")
    args = p.parse_args(argv)
    if len(args.layers) != 2 or args.layers[0] >= args.layers[1]:
        p.error(f"--layers needs two increasing counts; got {args.layers}")
    config = ModelConfig.preset(args.model)
    dtype = jnp.dtype(args.dtype)
    low, high = (count_launches(_session(config, n, args.batch, args.context, dtype))
                 for n in args.layers)
    per_layer = {k: (high.get(k, 0) - low.get(k, 0)) / (args.layers[1] - args.layers[0])
                 for k in set(low) | set(high)}
    rows = [{"layers": n, "step_ms": step_time(_session(config, n, args.batch, args.context,
                                                        dtype)) * 1e3}
            for n in args.time_layers]
    if len(rows) >= 2:
        slope = (rows[-1]["step_ms"] - rows[0]["step_ms"]) / (rows[-1]["layers"] - rows[0]["layers"])
        intercept = rows[0]["step_ms"] - slope * rows[0]["layers"]
    else:
        slope = intercept = None
    result = {"environment": environment(), "args": vars(args), "launches_per_layer": per_layer,
              f"launches_at_{args.layers[0]}_layers": low, "timed": rows,
              "ms_per_layer": slope, "ms_per_step_fixed": intercept}
    print(f"launching instructions per layer per decode token: "
          f"{ {k: v for k, v in sorted(per_layer.items()) if v} }")
    print_table(rows, ["layers", "step_ms"], title=f"decode step, {args.model} shape, batch "
                                                    f"{args.batch}, context {args.context}")
    if slope is not None:
        print(f"per layer {slope * 1e3:.1f} us, fixed per step {intercept * 1e3:.1f} us")
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
