"""The machine's ceilings, measured in the same run as the benchmark they bound.

- read bandwidth: a sum over a multi-GB buffer (bytes read / time; what a decode step's weights and
  KV cache are read at),
- copy bandwidth: ``x + 1`` over the same size (bytes read + bytes written / time),
- bf16 matmul rate: an 8192^3 product on random data (never zeros),

and the floors they give: a decode step cannot beat (weight bytes + KV bytes read) / read
bandwidth; a prefill chunk cannot beat its FLOPs / matmul rate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eval.common import measure_matmul_rate, time_call


PASSES = 16  # passes per timed program: one dispatch and sync amortised over many passes


def measure_read_bandwidth(nbytes: int = 4 << 30, repeats: int = 5) -> float:
    """Bytes/s of a read-dominated pass: the sum of a ``nbytes`` float32 buffer (4 GB by default,
    many times any cache), ``PASSES`` passes in one program (a pass per call would count the
    dispatch and the sync: measured 2.5-3.7 TB/s on the H200 where this gives 4.5)."""
    n = nbytes // 4
    x = jax.random.normal(jax.random.key(2), (n,), jnp.float32)

    @jax.jit
    def passes(a):
        # each pass reads a once (the scale fuses into the reduction; distinct, so not merged)
        return jax.lax.fori_loop(0, PASSES, lambda i, acc: acc + jnp.sum(a * (i + 1.0)), 0.0)

    t = time_call(lambda: passes(x), warmup=2, repeats=repeats)["median_s"]
    return PASSES * n * 4 / t


def measure_copy_bandwidth(nbytes: int = 4 << 30, repeats: int = 5) -> float:
    """Bytes/s counting bytes read plus bytes written, of ``x + 1`` over ``nbytes``, ``PASSES``
    passes in one program."""
    n = nbytes // 4
    x = jax.random.normal(jax.random.key(1), (n,), jnp.float32)

    @jax.jit
    def passes(a):
        return jax.lax.fori_loop(0, PASSES, lambda i, b: b + 1.0, a)

    t = time_call(lambda: passes(x), warmup=2, repeats=repeats)["median_s"]
    return PASSES * 2 * n * 4 / t


def measure_ceilings(*, small: bool = False) -> dict:
    """Read and copy bandwidth (bytes/s) and bf16 matmul rate (FLOP/s). ``small``: CPU-sized
    probes (64 MB, 1024^3)."""
    size = (64 << 20) if small else (4 << 30)
    return {"read_Bps": measure_read_bandwidth(size),
            "copy_Bps": measure_copy_bandwidth(size),
            "matmul_bf16_flops": measure_matmul_rate(1024 if small else 8192)}


def weight_bytes(params) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


def decode_step_bytes(params, config, *, batch: int, context: int, cache_dtype, rows: int | None = None,
                      rank: int = 0, lowrank_rows: int | None = None, embed_read_once: bool = True
                      ) -> int:
    """Bytes one decode step must read: every weight once (the embedding table only for its
    gathered rows when it is not also the output head) plus, per layer, the K and V of
    ``context`` positions for each of ``rows`` cache rows (default ``batch``) and the low-rank
    entries of ``lowrank_rows`` rows."""
    item = jnp.dtype(cache_dtype).itemsize
    total = weight_bytes(params)
    if not config.tie_embeddings and embed_read_once:
        embed = params["embed"]
        total -= embed.size * embed.dtype.itemsize - batch * embed.shape[1] * embed.dtype.itemsize
    rows = batch if rows is None else rows
    kv = 2 * rows * context * config.num_kv_heads * config.head_dim * item
    lowrank = (lowrank_rows if lowrank_rows is not None else rows) * context * rank * item
    return int(total + config.num_layers * (kv + (lowrank if rank else 0)))
