"""What the packed long-prefill lane saves: one call where some rows prefill a long chunk and the
others a short one, with the lane and without it, side by side in one run.

    python -m eval.bench_long_lane --random-weights llama3_1_8b --rows 8 --capacity 16384 \\
        --long 1,2,4,6 --lengths 2048,8192 --staircase                  # GPU, about 3 minutes
    python -m eval.bench_long_lane --random-weights tiny --rows 8 --capacity 4096 --lengths 1024

Random weights of a preset's shape with random plan / action / reflect adapters, in each
``--modes`` mode. A case is (rows with a long chunk, its length): after a reset, those rows append
``length`` random tokens (with ``--staircase``, the i-th of n long rows ``length (n - i) / n``:
chunks of different lengths, where the lane packs the shorter ones' segments together) and the
others ``--short`` tokens, each through its own agent, and every row generates one token (a call
that is nearly all prefill). Each case runs once untimed (compilation) and ``--repeats`` times
timed, on a session with the lane and on one without (the same shapes and rows otherwise); the
table gives the median call seconds of both, their ratio, the lane's segments per step
(``lane_rows``; 0: the session did not take it) and the row x position slots each computed, next
to the ideal ratio (the slots' ratio). JSON with device, versions, date and command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from eval.common import (NullTokenizer, csv_list, environment, positive_int_list, print_table,
                         write_json)
from lragent_jax.cache import ShareMode
from lragent_jax.config import ModelConfig
from lragent_jax.session import GenerationSettings, Session, Turn

AGENTS = ("plan", "action", "reflect")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.bench_long_lane", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random-weights", default=None, metavar="PRESET",
                   help="model shape (default llama3_1_8b on an accelerator, tiny on a CPU)")
    p.add_argument("--modes", type=csv_list(str), default=["base_lowrank_shared", "non_shared"],
                   help="comma-separated sharing modes (default base_lowrank_shared,non_shared)")
    p.add_argument("--rows", type=int, default=8, help="session rows (>= 2; default 8)")
    p.add_argument("--capacity", type=int, default=16384)
    p.add_argument("--long", type=positive_int_list, default=[1, 2, 4],
                   help="rows with a long chunk, one case each (default 1,2,4)")
    p.add_argument("--lengths", type=positive_int_list, default=[2048, 8192],
                   help="long chunk lengths in tokens (default 2048,8192)")
    p.add_argument("--staircase", action="store_true",
                   help="long chunks of falling lengths (length, ..., length / n) instead of one")
    p.add_argument("--short", type=int, default=8, help="the other rows' chunk (default 8)")
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--min-chunk-bucket", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench_long_lane.json")
    return p


def _check(parser, opts) -> None:
    try:
        opts.modes = [ShareMode.parse(m).value for m in opts.modes]
    except ValueError as e:
        parser.error(str(e))
    if not opts.modes:
        parser.error("--modes is empty")
    if opts.rows < 2:
        parser.error(f"--rows {opts.rows}: the lane needs at least 2 rows")
    if max(opts.long) > opts.rows:
        parser.error(f"--long {max(opts.long)}: more long rows than --rows {opts.rows}")
    if max(opts.lengths) + 1 > opts.capacity:
        parser.error(f"--lengths {max(opts.lengths)} does not fit --capacity {opts.capacity}")
    if not 1 <= opts.short < opts.min_chunk_bucket * 4:
        parser.error(f"--short {opts.short}: allowed 1..{opts.min_chunk_bucket * 4 - 1} (the short "
                     "lane takes chunks up to four smallest buckets)")
    if opts.repeats < 1:
        parser.error(f"--repeats {opts.repeats}: allowed >= 1")


def _lengths(rows: int, n_long: int, length: int, short: int, staircase: bool) -> list[int]:
    return [(length * (n_long - r) // n_long if staircase else length) if r < n_long else short
            for r in range(rows)]


def _case(session: Session, lengths: list[int], rng) -> float:
    session.reset()
    settings = GenerationSettings(max_new_tokens=1)
    vocab = session.config.vocab_size
    turns = {r: Turn(AGENTS[r % 3], append_ids=tuple(int(t) for t in rng.integers(3, vocab, n)),
                     settings=settings) for r, n in enumerate(lengths)}
    start = time.perf_counter()
    session.turn(turns)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.random_weights is None:
        opts.random_weights = "tiny" if jax.default_backend() == "cpu" else "llama3_1_8b"
    _check(parser, opts)
    from eval.common import tiny_config
    from eval.throughput import random_model

    shape = (tiny_config() if opts.random_weights == "tiny"
             else ModelConfig.preset(opts.random_weights))
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    config, params, lora, adapters = random_model(shape, rank=opts.rank, dtype=dtype,
                                                  seed=opts.seed)
    print(f"bench_long_lane: {config.name}, {opts.rows} rows x {opts.capacity}, modes "
          f"{opts.modes}, long rows {opts.long}, lengths {opts.lengths}", flush=True)
    rows, env = [], environment()
    out = {"environment": env, "args": vars(opts), "rows": rows}
    for mode in opts.modes:
        for n_long in opts.long:
            for length in opts.lengths:
                row = {"mode": mode, "long_rows": n_long, "length": length,
                       "staircase": opts.staircase}
                lengths = _lengths(opts.rows, n_long, length, opts.short, opts.staircase)
                for lane in (True, False):
                    session = Session(config, params, NullTokenizer(), adapters=adapters,
                                      lora=lora, mode=mode, batch=opts.rows,
                                      capacity=opts.capacity, prefill_chunk=opts.prefill_chunk,
                                      min_chunk_bucket=opts.min_chunk_bucket, long_lane=lane,
                                      seed=opts.seed)
                    rng = np.random.default_rng(opts.seed)
                    _case(session, lengths, rng)  # compiles
                    slots = session.prefill_slots
                    times = [_case(session, lengths, rng)
                             for _ in range(opts.repeats)]
                    key = "lane" if lane else "full"
                    row[f"{key}_s"] = statistics.median(times)
                    row[f"{key}_slots"] = (session.prefill_slots - slots) // opts.repeats
                    if lane:
                        row["lane_rows"] = session.last_long_lane
                    del session
                row["lane_over_full"] = row["lane_s"] / row["full_s"]
                row["slots_ratio"] = row["lane_slots"] / row["full_slots"]
                rows.append(row)
                print(f"  {mode} {n_long} x {length}: lane {row['lane_s']:.4f} s "
                      f"({row['lane_rows']} segments per step), full {row['full_s']:.4f} s, ratio "
                      f"{row['lane_over_full']:.3f} (slots {row['slots_ratio']:.3f})", flush=True)
                write_json(opts.out, out)
    print_table(rows, ["mode", "long_rows", "length", "staircase", "lane_rows", "lane_s", "full_s",
                       "lane_over_full", "slots_ratio"],
                title=f"one call, {opts.rows} rows, packed long-prefill lane vs every row "
                      f"({env['device']}, jax {jax.__version__}, {env['date']})")
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
