"""Jitted turns over the multi-agent cache: chunked prefill, then a blocked ``lax.while_loop`` decode.

A turn is ONE jitted call (prefill + decode) with bucketed static shapes and the cache donated.
Each batch row is one trajectory; each row may run a different agent (per-row adapter index) with
its own sampling settings and seed. The host decides what each row prefills (``session.py``); this
module only executes the plan. The model runs in the per-layer inference layout
(``lragent_jax.inference``): a Python loop over layers inside the jitted call, each layer reading
its own weight and cache buffers once per token.

Decode checks whether every row is done once every ``decode_block`` tokens (a static block of
known trip count inside the while loop): on a GPU each check is a device-to-host copy and a sync,
so small models decode several tokens per check. Rows that finish inside a block write nothing
more, so the tokens kept are exactly those of a per-token check.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, UInt

from lragent_jax.cache import (CacheSpec, KVCache, advance_lengths, cache_rows,
                               plan_chunk)
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.inference import forward_layers
from lragent_jax.lora import cache_view
from lragent_jax.model import logits_from_hidden

SAMPLING_KINDS = ("greedy", "sample", "sample_filtered")
# Candidates kept by top-k / top-p filtering before falling back to a full-vocabulary sort.
FILTER_CANDIDATES = 64


@dataclasses.dataclass(frozen=True)
class TurnShape:
    """The static part of a turn (a jit static argument; one compilation per distinct value)."""

    config: ModelConfig
    spec: CacheSpec
    lora: LoraConfig | None
    chunk_bucket: int  # padded length of the new-token chunk
    prefill_chunk: int  # tokens per prefill step (chunk_bucket is a multiple of it)
    max_new_bucket: int  # size of the output buffer (0: prefill only)
    sampling: str = "greedy"  # one of SAMPLING_KINDS
    attn_impl: str | None = None
    return_hidden: bool = False  # also return the chunk's final hidden states (scoring)
    decode_block: int = 1  # decode steps between two checks of "every row is done"
    # the packed long-prefill lane (0: off): the long chunks, cut in segments of prefill_chunk
    # tokens (``TurnInputs.long_row`` / ``long_offset``), prefill ``long_rows`` segments per step
    # whatever rows they come from; every other row prefills in steps of ``short_step`` tokens,
    # at most ``short_width`` in all (see ``_turn``)
    long_rows: int = 0
    short_step: int = 0
    short_width: int = 0

    def __post_init__(self):
        if self.sampling not in SAMPLING_KINDS:
            raise ValueError(f"sampling={self.sampling!r}; allowed: {SAMPLING_KINDS}")
        if self.chunk_bucket % self.prefill_chunk:
            raise ValueError("chunk_bucket must be a multiple of prefill_chunk")
        if self.decode_block < 1:
            raise ValueError(f"decode_block must be >= 1; got {self.decode_block}")
        if self.long_rows:
            if self.return_hidden:
                raise ValueError("the long-prefill lane does not return chunk hidden states")
            if not 0 < self.long_rows <= self.spec.batch:
                raise ValueError(f"long_rows={self.long_rows}; allowed: 1..{self.spec.batch}")
            if (self.short_step < 1 or self.short_width % self.short_step
                    or not 0 < self.short_width <= self.chunk_bucket):
                raise ValueError(f"short_step={self.short_step}, short_width={self.short_width}: "
                                 "the short lane needs 0 < short_step, short_width a multiple of "
                                 f"it and at most chunk_bucket={self.chunk_bucket}")

    @property
    def lane_segments(self) -> int:
        """Entries of ``TurnInputs.long_row`` / ``long_offset`` with the lane: room for every row's
        whole chunk bucket in segments of ``prefill_chunk``, rounded up to whole steps (0 without
        the lane)."""
        if not self.long_rows:
            return 0
        most = self.spec.batch * (self.chunk_bucket // self.prefill_chunk)
        return -(-most // self.long_rows) * self.long_rows


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tokens", "chunk_len", "start", "agent", "processed0", "filled0",
                                "max_new", "temperature", "top_p", "top_k", "stop_mask", "seed",
                                "counter", "long_row", "long_offset"],
                   meta_fields=[])
@dataclasses.dataclass
class TurnInputs:
    """Everything a turn needs per row (host arrays, one per field).

    tokens [B, C]: the chunk each row prefills (right-padded), chunk_len [B] its valid tokens,
    start [B] the trajectory position of its first token; agent [B] the row's agent (-1: none);
    processed0 [B, A] / filled0 [B] the host's authoritative lengths (after any rollback);
    max_new [B] tokens to generate at most; temperature / top_p / top_k [B] the row's sampling
    (temperature <= 0: greedy; top_k 0: off); stop_mask [B, V] tokens that end the row's output;
    seed [B], counter [B]: the row's sampling key is fold_in(key(seed), counter), so an episode's
    samples do not depend on which row or batch it runs in. long_row / long_offset
    [``TurnShape.lane_segments``]: the packed lane's segments in order, each the row it belongs to
    (B: padding) and where it starts in the row's chunk (a multiple of ``prefill_chunk``; a row's
    segments in order, so that each step's come after the ones they attend to); [0] without the
    lane.
    """

    tokens: Int[Array, "B C"]
    chunk_len: Int[Array, "B"]
    start: Int[Array, "B"]
    agent: Int[Array, "B"]
    processed0: Int[Array, "B A"]
    filled0: Int[Array, "B"]
    max_new: Int[Array, "B"]
    temperature: Float[Array, "B"]
    top_p: Float[Array, "B"]
    top_k: Int[Array, "B"]
    stop_mask: Bool[Array, "B V"]
    seed: UInt[Array, "B"]
    counter: Int[Array, "B"]
    long_row: Int[Array, "P"]
    long_offset: Int[Array, "P"]


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["arrays", "token", "out", "n_out", "done", "step"], meta_fields=[])
@dataclasses.dataclass
class DecodeState:
    """The decode loop's carry: cache buffers, the last sampled token [B], the output buffer
    [B, M], tokens kept per row [B], rows done [B], and the decode step."""

    arrays: object
    token: Int[Array, "B"]
    out: Int[Array, "B M"]
    n_out: Int[Array, "B"]
    done: Bool[Array, "B"]
    step: Int[Array, ""]


def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (at least ``minimum``)."""
    size = minimum
    while size < n:
        size *= 2
    return size


def _filter_threshold_sorted(scaled, top_p, top_k):
    vocab = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    n_keep = jnp.maximum(jnp.sum(cum_before < top_p[:, None], axis=-1), 1)
    pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    return jnp.maximum(kth, pth)


def filter_threshold(scaled: Float[Array, "B V"], top_p: Float[Array, "B"],
                     top_k: Int[Array, "B"]) -> Float[Array, "B 1"]:
    """The smallest scaled logit each row keeps under top-k and top-p (nucleus) filtering.

    From the ``FILTER_CANDIDATES`` largest logits when both cut-offs fall among them (the usual
    case), else from a full-vocabulary sort; the two give the same threshold."""
    vocab = scaled.shape[-1]
    cap = min(FILTER_CANDIDATES, vocab)
    if cap == vocab:
        return _filter_threshold_sorted(scaled, top_p, top_k)
    top, _ = jax.lax.top_k(scaled, cap)  # [B, cap], descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(top, jnp.clip(k - 1, 0, cap - 1)[:, None], axis=-1)
    probs = jnp.exp(top - jax.nn.logsumexp(scaled, axis=-1, keepdims=True))
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    kept = cum_before < top_p[:, None]
    n_keep = jnp.maximum(jnp.sum(kept, axis=-1), 1)
    pth = jnp.take_along_axis(top, (n_keep - 1)[:, None], axis=-1)
    # exact here unless the nucleus may reach past the candidates, or k does
    fits = (~kept[:, -1]) & (k <= cap)
    fast = jnp.maximum(kth, pth)
    return jax.lax.cond(jnp.all(fits), lambda: fast,
                        lambda: _filter_threshold_sorted(scaled, top_p, top_k))


def sample_tokens(logits: Float[Array, "B V"], keys, temperature, top_p, top_k, kind: str):
    """Next token per row from float32 logits; ``keys`` [B] (one PRNG key per row).

    temperature [B] (<= 0: greedy for that row), top_p [B] in (0, 1], top_k [B] (0: off).
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if kind == "greedy":
        return greedy
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    if kind == "sample_filtered":
        threshold = filter_threshold(scaled, top_p, top_k)
        scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled)
    return jnp.where(temperature <= 0, greedy, sampled.astype(jnp.int32))


def _step_keys(row_keys, step):
    return jax.vmap(lambda key: jax.random.fold_in(key, step))(row_keys)


@dataclasses.dataclass(frozen=True)
class _Lane:
    """The rows one prefill loop runs: their chunks [R, W], valid lengths, start positions,
    filled lengths and cache rows [R], and the forward pass over them."""

    tokens: Array
    chunk_len: Array
    start: Array
    filled0: Array
    kv_row: Array
    lowrank_row: Array
    forward: object


def _prefill(spec: CacheSpec, lane: _Lane, step: int, n_steps, carry):
    """``n_steps`` prefill steps of ``step`` tokens over ``lane``'s rows. ``carry``: (cache
    arrays, last hidden [R, D], chunk hidden [R, W, D] or None); each row's last hidden state is
    taken at its last valid token."""

    def body(i, carry):
        arrays, last_hidden, hidden_all = carry
        offset = i * step
        chunk = jax.lax.dynamic_slice_in_dim(lane.tokens, offset, step, axis=1)
        local = offset + jnp.arange(step, dtype=jnp.int32)[None, :]
        plan = plan_chunk(spec, lane.start[:, None] + local, local < lane.chunk_len[:, None],
                          lane.filled0, lane.kv_row, lane.lowrank_row,
                          kv_lengths=lane.start + jnp.clip(lane.chunk_len, 0, offset + step),
                          q_offset=lane.start + offset)
        hidden, arrays = lane.forward(chunk, plan=plan, cache=arrays)
        j = lane.chunk_len - 1 - offset
        here = (j >= 0) & (j < step)
        picked = jnp.take_along_axis(hidden, jnp.clip(j, 0, step - 1)[:, None, None], axis=1)[:, 0]
        last_hidden = jnp.where(here[:, None], picked, last_hidden)
        if hidden_all is not None:
            hidden_all = jax.lax.dynamic_update_slice_in_dim(hidden_all, hidden, offset, axis=1)
        return arrays, last_hidden, hidden_all

    return jax.lax.fori_loop(0, n_steps, body, carry)


def _packed_prefill(spec: CacheSpec, inputs: TurnInputs, kv_row, lowrank_row, forward, *,
                    width: int, per_step: int, carry):
    """The packed lane: the segments of ``inputs.long_row`` / ``long_offset`` (``width`` tokens
    each), ``per_step`` of them per prefill step, each as a row of the step reading and writing
    the cache row it belongs to. Segments of one row in the same step attend to each other's
    entries: every layer writes the step's entries before it attends, and a segment's keys end
    at its own last token. ``carry``: (cache arrays, last hidden [B, D]); a row's last hidden
    state is taken from the segment that holds its last token."""
    B = spec.batch
    real = inputs.long_row < B
    seg_row = jnp.where(real, inputs.long_row, 0)
    seg_len = jnp.where(real, jnp.clip(inputs.chunk_len[seg_row] - inputs.long_offset, 0, width),
                        0)
    local = jnp.arange(width, dtype=jnp.int32)

    def body(i, carry):
        arrays, last_hidden = carry
        part = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=i * per_step,
                                 slice_size=per_step)
        rows, offset, n = part(seg_row), part(inputs.long_offset), part(seg_len)
        chunk = jax.vmap(lambda r, o: jax.lax.dynamic_slice(inputs.tokens[r], (o,), (width,)))(
            rows, offset)
        first = inputs.start[rows] + offset
        plan = plan_chunk(spec, first[:, None] + local[None, :], local[None, :] < n[:, None],
                          inputs.filled0[rows], kv_row[rows], lowrank_row[rows],
                          kv_lengths=first + n, q_offset=first)
        hidden, arrays = forward(chunk, plan=plan, cache=arrays,
                                 adapter_index=inputs.agent[rows], kv_indirect=True,
                                 lowrank_indirect=True)
        ends = (n > 0) & (offset + n == inputs.chunk_len[rows])
        picked = hidden[jnp.arange(per_step), jnp.clip(n - 1, 0, width - 1)]
        last_hidden = last_hidden.at[jnp.where(ends, rows, B)].set(picked, mode="drop")
        return arrays, last_hidden

    steps = jnp.maximum(-(-jnp.sum(real) // per_step), 1)
    return jax.lax.fori_loop(0, steps, body, carry)


def _steps(chunk_len, step: int, most: int, least: int = 1):
    """Prefill steps of ``step`` tokens the longest of ``chunk_len`` needs, in least..most."""
    return jnp.clip(-(-jnp.max(chunk_len) // step), least, most)


def _turn(params, adapters, cache: KVCache, inputs: TurnInputs, *, shape: TurnShape):
    """The body of one jitted turn: the prefill, then the decode loop. One function on purpose
    (longer than 80 lines): both close over the same forward, cache rows and views, and splitting
    them would pass a dozen traced values between two halves of a program.

    Prefill, C tokens at a time, as many steps as the longest row needs (a chunk bucket wider than
    C serves every long chunk: one compilation for all of them). With the packed long-prefill
    lane (``shape.long_rows`` = P), the long chunks are cut in segments of C tokens and P segments
    prefill per step, whichever rows they come from (``_packed_prefill``), while every other row
    prefills its short chunk in steps of ``shape.short_step`` tokens: a call's prefill then costs
    about the tokens it brings, not all B rows over its longest chunk. Each row's tokens are the
    same either way; only which tokens share a step changes."""
    spec, config = shape.spec, shape.config
    B, C = spec.batch, shape.prefill_chunk
    view = cache_view(inputs.agent)
    kv_row, lowrank_row = cache_rows(spec, view)
    active = inputs.chunk_len > 0
    forward = functools.partial(
        forward_layers, params, config=config, lora=shape.lora, adapters=adapters,
        factored_v=spec.mode.factored_v, attn_impl=shape.attn_impl)
    dtype = params["embed"].dtype
    hidden_all = (jnp.zeros((B, shape.chunk_bucket, config.hidden_size), dtype)
                  if shape.return_hidden else None)
    last_hidden = jnp.zeros((B, config.hidden_size), dtype)
    arrays = cache.arrays

    def lane(chunk_len):  # every row, each over its first chunk_len tokens
        return _Lane(inputs.tokens, chunk_len, inputs.start, inputs.filled0, kv_row, lowrank_row,
                     functools.partial(forward, adapter_index=inputs.agent,
                                       kv_indirect=spec.mode.base_per_agent,
                                       lowrank_indirect=spec.mode.lowrank_per_agent))

    every_row = lane(inputs.chunk_len)
    if not shape.long_rows:
        arrays, last_hidden, hidden_all = _prefill(
            spec, every_row, C,
            _steps(inputs.chunk_len, C, shape.chunk_bucket // C), (arrays, last_hidden, hidden_all))
    else:
        is_long = jnp.zeros((B,), bool).at[inputs.long_row].set(True, mode="drop")
        short_len = jnp.where(is_long, 0, inputs.chunk_len)
        step = shape.short_step
        arrays, last_hidden, _ = _prefill(
            spec, lane(short_len), step,
            _steps(short_len, step, shape.short_width // step, least=0),
            (arrays, last_hidden, None))
        arrays, last_hidden = _packed_prefill(
            spec, inputs, kv_row, lowrank_row, forward, width=C, per_step=shape.long_rows,
            carry=(arrays, last_hidden))
    end = inputs.start + inputs.chunk_len  # trajectory length after the appended tokens

    M = shape.max_new_bucket
    if M == 0:
        processed, filled = advance_lengths(spec, inputs.processed0, inputs.filled0, view, active,
                                            end)
        new_cache = dataclasses.replace(cache, arrays=arrays, processed=processed, filled=filled)
        return new_cache, last_hidden, hidden_all

    # ---- decode
    row_keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(
        inputs.seed, inputs.counter)
    sample = functools.partial(sample_tokens, temperature=inputs.temperature, top_p=inputs.top_p,
                               top_k=inputs.top_k, kind=shape.sampling)

    def is_stop(tok):
        return jnp.take_along_axis(inputs.stop_mask, tok[:, None], axis=1)[:, 0]

    tok = sample(logits_from_hidden(params, last_hidden, config), _step_keys(row_keys, 0))
    n_out = active.astype(jnp.int32)
    state = DecodeState(arrays=arrays, token=tok, out=jnp.zeros((B, M), jnp.int32).at[:, 0].set(tok),
                        n_out=n_out, done=(~active) | is_stop(tok) | (n_out >= inputs.max_new),
                        step=jnp.int32(1))

    def decode_step(_, s: DecodeState) -> DecodeState:
        pos = end + s.n_out - 1  # where the last sampled token goes
        plan = plan_chunk(spec, pos[:, None], (~s.done)[:, None], inputs.filled0, kv_row,
                          lowrank_row, kv_lengths=jnp.clip(pos + 1, 0, spec.capacity),
                          q_offset=pos)
        hidden, arrays = every_row.forward(s.token[:, None], plan=plan, cache=s.arrays)
        new_tok = sample(logits_from_hidden(params, hidden[:, 0], config),
                         _step_keys(row_keys, s.step))
        new_tok = jnp.where(s.done, s.token, new_tok)
        out = jnp.where(s.done[:, None], s.out,
                        s.out.at[jnp.arange(B), jnp.minimum(s.n_out, M - 1)].set(new_tok))
        n_out = s.n_out + (~s.done).astype(jnp.int32)
        done = s.done | is_stop(new_tok) | (n_out >= inputs.max_new)
        return DecodeState(arrays, new_tok, out, n_out, done, s.step + 1)

    block = min(shape.decode_block, M)
    state = jax.lax.while_loop(
        lambda s: jnp.any(~s.done) & (s.step < M),
        lambda s: jax.lax.fori_loop(0, block, decode_step, s), state)

    fed = jnp.where(active, end + state.n_out - 1, 0)  # the last sampled token is not in the cache
    processed, filled = advance_lengths(spec, inputs.processed0, inputs.filled0, view, active, fed)
    new_cache = dataclasses.replace(cache, arrays=state.arrays, processed=processed, filled=filled)
    return new_cache, state.out, state.n_out


@functools.partial(jax.jit, static_argnames=("shape",), donate_argnames=("cache",))
def run_turn(params, adapters, cache: KVCache, inputs: TurnInputs, *, shape: TurnShape):
    """One jitted turn for every row: prefill ``inputs.tokens[:, :chunk_len]`` at ``start``, then
    decode. ``params``: inference layout; ``adapters``: prepared per-layer adapters (or None).

    Returns (cache, out [B, max_new_bucket] int32, n_out [B]). With ``max_new_bucket == 0`` returns
    (cache, last hidden [B, D], chunk hidden [B, T, D] or None) instead: prefill only.
    """
    return _turn(params, adapters, cache, inputs, shape=shape)
