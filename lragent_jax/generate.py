"""Jitted turns over the multi-agent cache: chunked prefill, then a ``lax.while_loop`` decode.

A turn is ONE jitted call (prefill + decode) with bucketed static shapes and the cache donated.
Each batch row is one trajectory; each row may run a different agent (per-row adapter index). The
host decides what each row prefills (see ``session.py``); this module only executes the plan.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lragent_jax.cache import CacheSpec, KVCache
from lragent_jax.config import ModelConfig
from lragent_jax.model import ChunkPlan, forward_hidden, logits_from_hidden

SAMPLING_KINDS = ("greedy", "sample", "sample_filtered")


@dataclasses.dataclass(frozen=True)
class TurnShape:
    """The static part of a turn (a jit static argument; one compilation per distinct value)."""

    config: ModelConfig
    spec: CacheSpec
    chunk_bucket: int  # padded length of the new-token chunk
    prefill_chunk: int  # tokens per prefill step (chunk_bucket is a multiple of it)
    max_new_bucket: int  # size of the output buffer (0: prefill only)
    sampling: str = "greedy"  # one of SAMPLING_KINDS
    attn_impl: str | None = None
    return_hidden: bool = False  # also return the chunk's final hidden states (scoring)
    unroll: int = 1  # layers per iteration of the layer scan

    def __post_init__(self):
        if self.sampling not in SAMPLING_KINDS:
            raise ValueError(f"sampling={self.sampling!r}; allowed: {SAMPLING_KINDS}")
        if self.chunk_bucket % self.prefill_chunk:
            raise ValueError("chunk_bucket must be a multiple of prefill_chunk")


def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (at least ``minimum``)."""
    size = minimum
    while size < n:
        size *= 2
    return size


def sample_tokens(logits, key, temperature, top_p, top_k, kind: str):
    """Next token per row from float32 logits [B, V].

    temperature [B] (<= 0: greedy for that row), top_p [B] in (0, 1], top_k [B] (0: off).
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if kind == "greedy":
        return greedy
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    if kind == "sample_filtered":
        vocab = logits.shape[-1]
        sorted_desc = -jnp.sort(-scaled, axis=-1)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        cum_before = jnp.cumsum(probs, axis=-1) - probs
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep_sorted = cum_before < top_p[:, None]
        n_keep = jnp.maximum(jnp.sum(keep_sorted, axis=-1), 1)
        pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
        threshold = jnp.maximum(kth, pth)
        scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    sampled = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature <= 0, greedy, sampled)


def _rows(spec: CacheSpec, view):
    batch_ids = jnp.arange(spec.batch, dtype=jnp.int32)
    kv_row = batch_ids * spec.num_agents + view if spec.mode.base_per_agent else batch_ids
    lowrank_row = (batch_ids * spec.num_agents + view if spec.mode.lowrank_kind == "per_agent"
                   else batch_ids)
    return kv_row, lowrank_row


def _write_positions(spec: CacheSpec, positions, valid, filled0):
    """Destinations of base and low-rank writes: S (dropped) for padding and for shared entries
    another agent already wrote."""
    S = spec.capacity
    fresh = positions >= filled0[:, None]
    base_ok = valid & (fresh | spec.mode.base_per_agent)
    lowrank_ok = valid & (fresh | (spec.mode.lowrank_kind == "per_agent"))
    return jnp.where(base_ok, positions, S), jnp.where(lowrank_ok, positions, S)


def _turn(params, adapters, cache: KVCache, tokens, chunk_len, start, agent, processed0, filled0,
          max_new, temperature, top_p, top_k, stop_mask, key, *, shape: TurnShape):
    spec, config = shape.spec, shape.config
    B, C = spec.batch, shape.prefill_chunk
    view = jnp.maximum(agent, 0)
    kv_row, lowrank_row = _rows(spec, view)
    arrays = cache.arrays
    active = chunk_len > 0
    forward = functools.partial(forward_hidden, config=config, adapters=adapters,
                                adapter_index=agent, bake_v=spec.mode.bake_v,
                                attn_impl=shape.attn_impl, unroll=shape.unroll)

    # ---- prefill, C tokens at a time
    n_steps = shape.chunk_bucket // C
    hidden_all = (jnp.zeros((B, shape.chunk_bucket, config.hidden_size),
                            params["embed"].dtype) if shape.return_hidden else None)

    def prefill_step(i, carry):
        arrays, last_hidden, hidden_all = carry
        offset = i * C
        chunk = jax.lax.dynamic_slice_in_dim(tokens, offset, C, axis=1)
        local = offset + jnp.arange(C, dtype=jnp.int32)[None, :]
        positions = start[:, None] + local
        valid = local < chunk_len[:, None]
        base_write, lowrank_write = _write_positions(spec, positions, valid, filled0)
        plan = ChunkPlan(positions=positions, q_offset=start + offset,
                         kv_lengths=start + jnp.clip(chunk_len, 0, offset + C),
                         base_write=base_write, lowrank_write=lowrank_write, kv_row=kv_row,
                         lowrank_row=lowrank_row)
        hidden, arrays = forward(params, chunk, plan=plan, cache=arrays)
        j = chunk_len - 1 - offset
        here = (j >= 0) & (j < C)
        picked = jnp.take_along_axis(hidden, jnp.clip(j, 0, C - 1)[:, None, None], axis=1)[:, 0]
        last_hidden = jnp.where(here[:, None], picked, last_hidden)
        if hidden_all is not None:
            hidden_all = jax.lax.dynamic_update_slice_in_dim(hidden_all, hidden, offset, axis=1)
        return arrays, last_hidden, hidden_all

    last_hidden = jnp.zeros((B, config.hidden_size), params["embed"].dtype)
    arrays, last_hidden, hidden_all = jax.lax.fori_loop(
        0, n_steps, prefill_step, (arrays, last_hidden, hidden_all))
    end = start + chunk_len  # trajectory length after the appended tokens

    M = shape.max_new_bucket
    if M == 0:
        mine = jnp.arange(spec.num_agents)[None, :] == view[:, None]
        processed = jnp.where(active[:, None] & mine, end[:, None], processed0)
        filled = jnp.where(active, jnp.maximum(filled0, end), filled0)
        new_cache = dataclasses.replace(cache, arrays=arrays, processed=processed, filled=filled)
        return new_cache, last_hidden, hidden_all

    # ---- decode
    keys = jax.random.split(key, M)
    logits = logits_from_hidden(params, last_hidden, config)
    tok = sample_tokens(logits, keys[0], temperature, top_p, top_k, shape.sampling)
    out = jnp.zeros((B, M), jnp.int32).at[:, 0].set(tok)
    n_out = active.astype(jnp.int32)
    is_stop = jnp.take_along_axis(stop_mask, tok[:, None], axis=1)[:, 0]
    done = (~active) | is_stop | (n_out >= max_new)

    def cond(state):
        _, _, _, _, done, step = state
        return jnp.any(~done) & (step < M)

    def body(state):
        arrays, tok, out, n_out, done, step = state
        pos = end + n_out - 1  # where the last sampled token goes
        base_write, lowrank_write = _write_positions(spec, pos[:, None], (~done)[:, None], filled0)
        plan = ChunkPlan(positions=pos[:, None], q_offset=pos,
                         kv_lengths=jnp.clip(pos + 1, 0, spec.capacity),
                         base_write=base_write, lowrank_write=lowrank_write, kv_row=kv_row,
                         lowrank_row=lowrank_row)
        hidden, arrays = forward(params, tok[:, None], plan=plan, cache=arrays)
        logits = logits_from_hidden(params, hidden[:, 0], config)
        new_tok = sample_tokens(logits, keys[step], temperature, top_p, top_k, shape.sampling)
        new_tok = jnp.where(done, tok, new_tok)
        out = jnp.where(done[:, None], out,
                        out.at[jnp.arange(B), jnp.minimum(n_out, M - 1)].set(new_tok))
        n_out = n_out + (~done).astype(jnp.int32)
        is_stop = jnp.take_along_axis(stop_mask, new_tok[:, None], axis=1)[:, 0]
        done = done | is_stop | (n_out >= max_new)
        return arrays, new_tok, out, n_out, done, step + 1

    arrays, _, out, n_out, _, _ = jax.lax.while_loop(
        cond, body, (arrays, tok, out, n_out, done, jnp.int32(1)))

    fed = jnp.where(active, end + n_out - 1, 0)  # the last sampled token is not in the cache
    mine = jnp.arange(spec.num_agents)[None, :] == view[:, None]
    processed = jnp.where(active[:, None] & mine, fed[:, None], processed0)
    filled = jnp.where(active, jnp.maximum(filled0, fed), filled0)
    new_cache = dataclasses.replace(cache, arrays=arrays, processed=processed, filled=filled)
    return new_cache, out, n_out


@functools.partial(jax.jit, static_argnames=("shape",), donate_argnames=("cache",))
def run_turn(params, adapters, cache, tokens, chunk_len, start, agent, processed0, filled0, max_new,
             temperature, top_p, top_k, stop_mask, key, *, shape: TurnShape):
    """One jitted turn for every row: prefill ``tokens[:, :chunk_len]`` at ``start``, then decode.

    ``processed0`` [B, A] / ``filled0`` [B] are the host's authoritative lengths (after any rollback).
    Returns (cache, out [B, max_new_bucket] int32, n_out [B]). With ``max_new_bucket == 0`` returns
    (cache, last hidden [B, D], chunk hidden [B, T, D] or None) instead: prefill only.
    """
    return _turn(params, adapters, cache, tokens, chunk_len, start, agent, processed0, filled0,
                 max_new, temperature, top_p, top_k, stop_mask, key, shape=shape)
