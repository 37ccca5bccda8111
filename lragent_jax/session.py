"""Host side of multi-agent trajectories sharing one cache.

A ``Session`` holds B independent trajectories (batch rows), each an append-only log of token ids,
and the device cache of one sharing mode. A turn appends text for some rows and lets each of those
rows' agents generate; the session decides what each agent must prefill under the mode and runs all
rows in one jitted call (rows may be at different agents' turns).

The host lengths (``processed[b, a]``, ``filled[b]``) are authoritative: after a stop string cuts an
output, they are rolled back to the tokens kept, and later turns simply overwrite the stale entries.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lragent_jax.cache import (CacheSpec, KVCache, ShareMode, analytic_cache_bytes,
                               check_mode_compatible, init_cache, measured_cache_bytes)
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.generate import SAMPLING_KINDS, TurnInputs, TurnShape, bucket, run_turn
from lragent_jax.inference import (check_fused_adapters, fuse_adapters, fused_groups,
                                   prepare_adapters, to_inference_params)
from lragent_jax import sharding
from lragent_jax.runtime import persistent_cache_active
from lragent_jax.lora import NO_ADAPTER, cache_view, validate_adapters
from lragent_jax.stops import stop_index
from pallas_kernels.flash_lora_attention.api import IMPLEMENTATIONS


# stop-string sets whose vocabulary masks a session keeps (a server sees one per client's stops)
STOP_MASK_CACHE = 256
# A prefill step's fixed cost in tokens' worth of compute, for the packed lane's choice of
# segments per step: each step reads every weight once, which on a Hopper GPU in bf16 takes about
# as long as computing ~190 tokens (its FLOP/byte ridge), plus the step's launches.
LANE_STEP_TOKENS = 256


class CapacityError(ValueError):
    """A turn would write past the cache capacity."""


class TokenAlignmentError(ValueError):
    """New text does not tokenize as an extension of the tokens already in the trajectory."""


@functools.partial(jax.jit, static_argnames=("config",))
def _score_positions(params, hidden, targets, *, config: ModelConfig):
    """Log-probability of each target and whether it is the greedy choice, from final hidden
    states [T, D] (float32 logits)."""
    from lragent_jax.model import logits_from_hidden

    logp = jax.nn.log_softmax(logits_from_hidden(params, hidden, config), axis=-1)
    picked = jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    return picked, jnp.argmax(logp, axis=-1) == targets


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How one row generates in a turn.

    ``seed``: the row's own sampling seed (None: drawn from the session's seed). A row's sampling
    key is derived from its seed and its trajectory length at the turn, so an episode with seeds
    samples the same tokens whatever row or batch it runs in.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop: tuple[str, ...] = ()  # stop strings (the output is cut before the first one)
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS ids
    seed: int | None = None

    def __post_init__(self):
        def number(name, kinds):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"{name} must be a number; got {value!r}")
            return value

        if (isinstance(self.max_new_tokens, bool)
                or not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be an int >= 1; got {self.max_new_tokens!r}")
        temperature = number("temperature", (int, float, np.number))
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy); got "
                             f"{temperature!r}")
        top_p = number("top_p", (int, float, np.number))
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) \
                or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off); got {self.top_k!r}")
        if isinstance(self.stop, str):
            raise ValueError(f"stop must be a sequence of strings, not one string; got "
                             f"{self.stop!r} (write stop=({self.stop!r},))")
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings; got {self.stop!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(
                self.seed, (int, np.integer)) or not 0 <= self.seed < 2 ** 32):
            raise ValueError(f"seed must be None or an int in [0, 2**32); got {self.seed!r}")


@dataclasses.dataclass(frozen=True)
class Turn:
    """What one row does in a turn: append text (and/or token ids), then ``agent`` generates.

    ``agent``: a name from the LoRA config, an index, or None for the bare base model.
    ``score_tokens``: instead of generating, append these tokens as the agent's output and return
    their log-probabilities under the agent's view (teacher forcing).
    """

    agent: str | int | None
    append: str = ""
    append_ids: tuple[int, ...] = ()
    settings: GenerationSettings = GenerationSettings()
    score_tokens: tuple[int, ...] | None = None


@dataclasses.dataclass
class TurnResult:
    text: str
    token_ids: list[int]
    stop_reason: str  # "eos", "stop", "length" or "scored"
    prefilled: int  # tokens this row's agent prefilled in this turn
    logprobs: np.ndarray | None = None  # teacher forcing: log p of each scored token
    greedy_match: np.ndarray | None = None  # teacher forcing: argmax == scored token


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def _power_of_two(name: str, value) -> int:
    value = _positive_int(name, value)
    if value & (value - 1):
        raise ValueError(f"{name} must be a power of two; got {value}")
    return value


def default_decode_block(params: dict) -> int:
    """Decode steps between two device-to-host checks of "every row is done": 1 on a CPU (a check
    costs nothing there, and every step past the end is wasted work) and for models over 2 GB
    (one check is under 1% of their step); 8 for small models on an accelerator, whose steps are
    short enough for the check to matter (measured: ``eval.bench_generate``)."""
    if jax.default_backend() == "cpu":
        return 1
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return 1 if weight_bytes > 2e9 else 8


def default_prefill_chunk(min_chunk_bucket: int) -> int:
    """Tokens per prefill step when a session is not told: on a CPU the smallest chunk bucket, so
    every turn of a session is one compiled program (compiling a many-layer turn takes seconds
    there, and a CPU gains nothing from longer steps); 512 on an accelerator, whose matmuls want
    long chunks."""
    if jax.default_backend() == "cpu":
        return 1 << max(0, int(min_chunk_bucket) - 1).bit_length()
    return 512


class Session:
    """B trajectories, A agents, one cache of a sharing mode.

    Args:
      config, params, tokenizer: the base model. ``params`` in either layout; stacked
        (training-layout) params are converted to the per-layer inference layout and, with
        adapters, get the adapters' A matrices appended (``inference.fuse_adapters``): each a copy
        of the weights. A loaded ``Model``'s params (or ``fuse_adapters`` output) are already in
        that form: sessions then share one copy.
      adapters, lora: multi-agent adapters (None: base model only, one agent view).
      mode: a ``ShareMode`` or its name.
      batch: number of trajectories (rows).
      capacity: cache positions per trajectory (at most the model's position limit).
      cache_dtype: float32, bfloat16 or float16 (default: the params' dtype).
      attn_impl: attention implementation (None: chosen per call shape and platform).
      prefill_chunk: tokens per prefill step inside a turn (a power of two; bounds attention
        memory; None: ``default_prefill_chunk``). At or below ``min_chunk_bucket``, every turn runs
        one compiled program, whatever its chunk length.
      min_chunk_bucket: smallest padded chunk length (fewer distinct compilations when larger;
        chunks longer than ``prefill_chunk`` share one compilation whatever their length).
      min_new_bucket: smallest output buffer of a turn (the decode loop stops at each row's limit,
        so a larger buffer only costs memory, and saves compilations).
      decode_block: decode steps between two checks that every row is done (None: see
        ``default_decode_block``).
      long_lane: when rows bring long chunks (more than four smallest chunk buckets), cut those
        chunks in segments of the prefill step and prefill a fixed number of segments per step
        whatever rows they come from (the packed lane: an eighth, a quarter, half or all of the
        batch, ``lane_sizes``), and every other row's short chunk in steps of
        ``min_chunk_bucket`` tokens, instead of every row over the longest chunk; taken when it
        computes at most 3/4 of the tokens. A call's prefill then costs about the tokens it
        brings. The tokens each row gets are the same; each distinct lane size is one more
        compiled program. None: on when ``prefill_chunk > min_chunk_bucket`` (the accelerator
        default) and there is no mesh.
      seed: PRNG seed for sampling rows whose settings carry no seed of their own.
      cache_sharding: optional leaf name -> Sharding for the cache (multi-device).
      mesh: a (data, model) ``jax.sharding.Mesh`` (``sharding.make_mesh``) to run on: the weights
        are laid out and placed for it (``sharding.shard_inference_params``; pass a
        ``sharding.shard_model`` model's params to share one copy), the cache by
        ``sharding.cache_shardings`` unless ``cache_sharding`` says otherwise, rows over ``data``
        and heads over ``model``, and every turn runs with the mesh set, so attention runs once
        per shard. Several processes (``sharding.initialize_distributed``) each run the same
        session on the same inputs.

    Failure: a turn either completes or leaves the token logs and counters exactly as they were.
    If it fails inside the compiled call after the donated cache was consumed (e.g. a device
    out-of-memory), the cache is rebuilt empty, and the next turn first replays every row's past
    prefills in their original order, each through the agent that made it, so every cache entry
    is again the one its writer computed and later turns give an uninterrupted session's results
    (up to float rounding: replayed decode tokens go through the prefill path).
    """

    def __init__(self, config: ModelConfig, params: dict, tokenizer, *, adapters: dict | None = None,
                 lora: LoraConfig | None = None, mode: str | ShareMode = "base_lowrank_shared",
                 batch: int = 1, capacity: int = 2048, cache_dtype=None,
                 attn_impl: str | None = None, prefill_chunk: int | None = None, seed: int = 0,
                 cache_sharding: Mapping | None = None, min_chunk_bucket: int = 16,
                 min_new_bucket: int = 8, decode_block: int | None = None, mesh=None,
                 long_lane: bool | None = None):
        self.mode = ShareMode.parse(mode)
        if (adapters is None) != (lora is None):
            raise ValueError("pass adapters together with their LoraConfig (or neither)")
        if adapters is not None:
            validate_adapters(adapters, config, lora)
        check_mode_compatible(self.mode, lora, adapters)
        batch = _positive_int("batch", batch)
        capacity = _positive_int("capacity", capacity, 2)
        if capacity > config.max_position_embeddings:
            raise ValueError(f"capacity {capacity} exceeds the model's position limit "
                             f"max_position_embeddings={config.max_position_embeddings}")
        self.min_chunk_bucket = _positive_int("min_chunk_bucket", min_chunk_bucket)
        self.prefill_chunk = _power_of_two("prefill_chunk", default_prefill_chunk(
            self.min_chunk_bucket) if prefill_chunk is None else prefill_chunk)
        self.min_new_bucket = _positive_int("min_new_bucket", min_new_bucket)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an int >= 0; got {seed!r}")
        if attn_impl is not None and attn_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attn_impl={attn_impl!r}; allowed: None or {IMPLEMENTATIONS}")
        self.config, self.tokenizer = config, tokenizer
        if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
            raise ValueError(f"mesh must be a jax.sharding.Mesh (lragent_jax.sharding.make_mesh) "
                             f"or None; got {type(mesh).__name__}")
        self.mesh = mesh
        if long_lane not in (None, True, False):
            raise ValueError(f"long_lane must be True, False or None (automatic); got {long_lane!r}")
        if long_lane and mesh is not None:
            raise ValueError("long_lane=True needs a session without a mesh (rows are sharded "
                             "over the mesh's data axis); pass None or False")
        self.long_lane = (self.prefill_chunk > self.min_chunk_bucket and mesh is None
                          if long_lane is None else long_lane)
        if mesh is not None:
            params = sharding.shard_inference_params(params, config, mesh)
        params = to_inference_params(params, config)
        if adapters is not None and fused_groups(params, config):
            check_fused_adapters(params, config, adapters, lora)
        elif adapters is not None:
            params = fuse_adapters(params, config, adapters, lora)  # this session's own copy
            if mesh is not None:
                params = sharding.shard_inference_params(params, config, mesh)
        self.params = params
        self.adapters, self.lora = adapters, lora
        self.num_agents = lora.num_agents if lora is not None else 1
        self.agent_names = tuple(lora.agents) if lora is not None else ("base",)
        cache_dtype = cache_dtype or self.params["embed"].dtype
        self.spec = CacheSpec.create(config, self.mode, num_agents=self.num_agents, batch=batch,
                                     capacity=capacity, lora=lora, dtype=cache_dtype)
        self._prepared = prepare_adapters(adapters, config, lora,
                                          factored_v=self.mode.factored_v,
                                          dtype=self.params["embed"].dtype,
                                          fused=fused_groups(self.params, config))
        if mesh is not None:
            self._prepared = sharding.replicate(self._prepared, mesh)
            if cache_sharding is None:
                cache_sharding = sharding.cache_shardings(self.spec, mesh)
        self.attn_impl = attn_impl
        self.decode_block = (default_decode_block(self.params) if decode_block is None
                             else _positive_int("decode_block", decode_block))
        self._cache_sharding = cache_sharding
        self.cache: KVCache = init_cache(self.spec, cache_sharding)
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.processed = np.zeros((batch, self.num_agents), np.int64)
        self.filled = np.zeros((batch,), np.int64)
        self.prefilled = np.zeros((batch, self.num_agents), np.int64)
        self.decoded = np.zeros((batch, self.num_agents), np.int64)
        # per row, every committed turn's (first, end, agent): the agent computed the entries of
        # positions first..end-1 of its view (what a rebuilt cache replays)
        self._history: list[list[tuple[int, int, int]]] = [[] for _ in range(batch)]
        self._replay_pending = False
        self._rng = np.random.default_rng(int(seed))
        self._stop_masks: collections.OrderedDict = collections.OrderedDict()
        self._token_strings: list[str] | None = None
        self.last_turn_seconds = 0.0
        self.last_long_lane = 0  # segments per step of the last turn's long-prefill lane (0: none)
        self.prefill_slots = 0  # row x position slots the prefill of every turn computed

    # ------------------------------------------------------------------ trajectories
    @property
    def batch(self) -> int:
        return self.spec.batch

    @property
    def capacity(self) -> int:
        return self.spec.capacity

    def _check_row(self, row: int) -> int:
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) \
                or not 0 <= row < self.batch:
            raise ValueError(f"trajectory {row!r} out of range; this session has rows "
                             f"0..{self.batch - 1}")
        return int(row)

    def text(self, row: int) -> str:
        self._check_row(row)
        return self.tokenizer.decode(self.tokens[row])

    def append_tokens(self, row: int, ids: Sequence[int]) -> None:
        self._check_row(row)
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} out of range for vocab size {self.config.vocab_size}")
        if len(self.tokens[row]) + len(ids) > self.capacity:
            raise CapacityError(
                f"trajectory {row}: appending {len(ids)} tokens to its {len(self.tokens[row])} would "
                f"exceed the cache capacity {self.capacity}")
        self.tokens[row].extend(ids)

    def append_text(self, row: int, text: str) -> list[int]:
        """Append ``text`` tokenized on its own (a segment): boundaries never merge tokens."""
        ids = self.tokenizer.encode(text) if text else []
        self.append_tokens(row, ids)
        return ids

    def extend_text(self, row: int, full_text: str) -> list[int]:
        """Set the trajectory to ``full_text``, which must extend it: the tokens already there must
        be a prefix of ``full_text``'s tokens (no silent misalignment at a token boundary)."""
        self._check_row(row)
        new = self.tokenizer.encode(full_text)
        old = self.tokens[row]
        n = min(len(old), len(new))
        mismatch = next((i for i in range(n) if old[i] != new[i]), None)
        if mismatch is None and len(new) < len(old):
            mismatch = len(new)
        if mismatch is not None:
            got = new[mismatch] if mismatch < len(new) else None
            raise TokenAlignmentError(
                f"trajectory {row}: the cached tokens are not a prefix of the new text's tokens; "
                f"first difference at token {mismatch}: cached {old[mismatch]} "
                f"({self.tokenizer.decode([old[mismatch]])!r}) vs new "
                f"{got} ({self.tokenizer.decode([got]) if got is not None else 'end of text'!r})")
        added = new[len(old):]
        self.append_tokens(row, added)
        return added

    def truncate(self, row: int, length: int) -> None:
        """Cut trajectory ``row`` to its first ``length`` tokens (cache entries past it go stale;
        ``length`` in 0..len(trajectory))."""
        row = self._check_row(row)
        if (isinstance(length, bool) or not isinstance(length, (int, np.integer))
                or not 0 <= length <= len(self.tokens[row])):
            raise ValueError(f"trajectory {row}: truncate length must be an int in "
                             f"0..{len(self.tokens[row])}; got {length!r}")
        length = int(length)
        del self.tokens[row][length:]
        self._history[row] = [(first, min(end, length), agent)
                              for first, end, agent in self._history[row] if first < length]
        self.processed[row] = np.minimum(self.processed[row], length)
        self.filled[row] = min(self.filled[row], length)

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Start new trajectories in ``rows`` (default all); the cache buffers are reused."""
        for row in (range(self.batch) if rows is None else rows):
            row = self._check_row(row)
            self.truncate(row, 0)
            self.prefilled[row] = 0
            self.decoded[row] = 0

    # ------------------------------------------------------------------ accounting
    def cache_bytes(self) -> dict:
        return measured_cache_bytes(self.cache)

    def analytic_cache_bytes(self) -> dict:
        return analytic_cache_bytes(self.config, self.mode, num_agents=self.num_agents,
                                    capacity=self.capacity, rank=self.spec.rank or 0,
                                    batch=self.batch, dtype=self.spec.dtype,
                                    v_adapter=self.spec.rank > 0)

    def prefill_counts(self) -> dict[str, int]:
        """Tokens each agent prefilled so far, summed over trajectories."""
        return {name: int(self.prefilled[:, i].sum()) for i, name in enumerate(self.agent_names)}

    # ------------------------------------------------------------------ turns
    def _agent_index(self, agent) -> int:
        if agent is None:
            return NO_ADAPTER
        if self.lora is None:
            raise ValueError(f"agent {agent!r} given but this session has no adapters; use agent=None")
        if isinstance(agent, bool):
            raise ValueError(f"agent must be a name, an index or None; got {agent!r}")
        if isinstance(agent, np.integer):
            agent = int(agent)
        return self.lora.agent_index(agent)

    def _all_token_strings(self) -> list[str]:
        if self._token_strings is None:
            n = min(self.config.vocab_size, getattr(self.tokenizer, "vocab_size", self.config.vocab_size))
            strings = [self.tokenizer.decode([i]) for i in range(n)]
            self._token_strings = strings + [""] * (self.config.vocab_size - n)
        return self._token_strings

    def _stop_mask(self, settings: GenerationSettings) -> np.ndarray:
        key = (settings.stop, settings.stop_token_ids)
        if key in self._stop_masks:
            self._stop_masks.move_to_end(key)
        else:
            while len(self._stop_masks) >= STOP_MASK_CACHE:  # least recently used first
                self._stop_masks.popitem(last=False)
            mask = np.zeros((self.config.vocab_size,), bool)
            for t in tuple(self.config.eos_token_ids) + tuple(
                    getattr(self.tokenizer, "eos_token_ids", ())) + settings.stop_token_ids:
                if 0 <= t < self.config.vocab_size:
                    mask[t] = True
            if settings.stop:
                for i, s in enumerate(self._all_token_strings()):
                    if s and any(stop in s for stop in settings.stop):
                        mask[i] = True
            self._stop_masks[key] = mask
        return self._stop_masks[key]

    def _eos_ids(self) -> set[int]:
        return set(self.config.eos_token_ids) | set(getattr(self.tokenizer, "eos_token_ids", ()))

    def _plan_row(self, row: int, turn: Turn) -> "_RowPlan":
        """Check one row's turn and say what it appends, prefills and generates (no mutation)."""
        if not isinstance(turn, Turn):
            raise ValueError(f"trajectory {row}: expected a Turn; got {type(turn).__name__}")
        agent = self._agent_index(turn.agent)
        add = (self.tokenizer.encode(turn.append) if turn.append else []) + [
            int(t) for t in turn.append_ids]
        scored = [int(t) for t in turn.score_tokens] if turn.score_tokens is not None else None
        length = len(self.tokens[row]) + len(add)
        total = length + (len(scored) if scored is not None else 0)
        if length == 0:
            raise ValueError(f"trajectory {row} is empty: append a prompt before a turn")
        max_new = 0 if scored is not None else turn.settings.max_new_tokens
        if scored is not None and not scored:
            raise ValueError(f"trajectory {row}: score_tokens is empty")
        if total + max(max_new - 1, 0) > self.capacity:
            raise CapacityError(
                f"trajectory {row}: length {total} plus up to {max_new} new tokens exceeds the "
                f"cache capacity {self.capacity}; nothing was changed (start a session with a "
                "larger capacity)")
        bad = [t for t in add + (scored or []) if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"trajectory {row}: token ids {bad[:5]} out of range for vocab size "
                             f"{self.config.vocab_size}")
        view = cache_view(agent)
        need = length - 1  # the last context token must run to predict what follows
        start = self.processed[row, view] if self.mode.per_agent_view else self.filled[row]
        return _RowPlan(agent=agent, view=view, add=add, scored=scored, length=length,
                        total=total, max_new=max_new, start=int(min(start, need)))

    def turn(self, turns: Mapping[int, Turn]) -> dict[int, TurnResult]:
        """Run one turn for the given rows (others stay untouched) in one jitted call.

        All or nothing: if any row's turn is invalid, or the call fails, no host state changes
        (see the class docstring for the cache after a failure inside the call)."""
        if not turns:
            return {}
        if self._replay_pending:
            self._replay()
        B = self.batch
        plans = {}
        for row, turn in turns.items():
            row = self._check_row(row)
            plans[row] = self._plan_row(row, turn)
        kinds = {p.scored is not None for p in plans.values()}
        if len(kinds) > 1:
            raise ValueError("a turn either scores tokens on every row or generates on every row")
        scoring = kinds.pop()

        inputs = self._empty_inputs()
        chunks = {}
        for row, plan in plans.items():
            settings = turns[row].settings
            full = self.tokens[row] + plan.add + (plan.scored or [])
            chunks[row] = full[plan.start:plan.total]
            inputs.start[row], inputs.chunk_len[row] = plan.start, plan.total - plan.start
            inputs.agent[row], inputs.max_new[row] = plan.agent, max(plan.max_new, 1)
            inputs.temperature[row] = settings.temperature
            inputs.top_p[row], inputs.top_k[row] = settings.top_p, settings.top_k
            inputs.stop_mask[row] = self._stop_mask(settings)
            inputs.seed[row] = (settings.seed if settings.seed is not None
                                else self._rng.integers(0, 2 ** 32, dtype=np.uint32))
            inputs.counter[row] = plan.length
        sampling = "greedy"
        if not scoring and any(turns[r].settings.temperature > 0 for r in plans):
            filtered = any(turns[r].settings.top_p < 1 or turns[r].settings.top_k > 0 for r in plans)
            sampling = "sample_filtered" if filtered else "sample"
        chunk_bucket = self._chunk_bucket(int(inputs.chunk_len.max()))
        inputs.tokens = np.zeros((B, chunk_bucket), np.int32)
        for row, ids in chunks.items():
            inputs.tokens[row, :len(ids)] = ids
        lane = {} if scoring else self._long_lane(inputs, chunk_bucket)
        shape = self._shape(chunk_bucket, 0 if scoring else bucket(int(inputs.max_new.max()),
                                                                  self.min_new_bucket),
                            sampling=sampling, return_hidden=scoring, **lane)
        t0 = time.perf_counter()
        try:
            with self._on_mesh():
                cache, *outputs = run_turn(self.params, self._prepared, self.cache, inputs,
                                           shape=shape)
            outputs = sharding.fetch(outputs)
        except BaseException:
            self._recover_cache()
            raise
        self.cache = cache
        self.last_turn_seconds = time.perf_counter() - t0
        self.last_long_lane = shape.long_rows
        self.prefill_slots += self._prefill_slots(
            inputs.chunk_len, shape.prefill_chunk, sorted({int(r) for r in inputs.long_row
                                                           if r < B}), **lane)
        for row, plan in plans.items():  # the call succeeded: commit the appended tokens
            self.tokens[row].extend(plan.add + (plan.scored or []))
        if scoring:
            return self._finish_scoring(plans, outputs[1])
        return self._finish_generation(turns, plans, inputs.chunk_len, *outputs)

    def _shape(self, chunk_bucket: int, max_new_bucket: int, **fields) -> TurnShape:
        """The compiled program of a call: its chunk bucket, output buffer (0: prefill only) and
        ``fields`` (sampling, return_hidden, the long-prefill lane)."""
        return TurnShape(config=self.config, spec=self.spec, lora=self.lora,
                         chunk_bucket=chunk_bucket,
                         prefill_chunk=min(self.prefill_chunk, chunk_bucket),
                         max_new_bucket=max_new_bucket, attn_impl=self.attn_impl,
                         decode_block=self.decode_block, **fields)

    def turn_programs(self, max_new_tokens: Sequence[int] = (),
                      sampling: Sequence[str] = ("greedy",)) -> list[TurnShape]:
        """Every compiled program a generating turn of this session may run, for turns of at most
        the given ``max_new_tokens`` (each rounded up to its output buffer; default: the
        smallest, ``min_new_bucket``) and the given sampling kinds (``generate.SAMPLING_KINDS``):
        every chunk bucket a chunk up to the capacity can take, each without the long-prefill
        lane and with each lane size it can take. ``warm_up`` compiles them."""
        bad = [k for k in sampling if k not in SAMPLING_KINDS]
        if bad or not sampling:
            raise ValueError(f"sampling={tuple(sampling)!r}; allowed: one or more of "
                             f"{SAMPLING_KINDS}")
        for n in max_new_tokens:
            _positive_int("max_new_tokens", n)
        outputs = sorted({bucket(int(n), self.min_new_bucket) for n in max_new_tokens}
                         or {self.min_new_bucket})
        longest = [min(1 << k, self.capacity) for k in range(self.capacity.bit_length() + 1)]
        variants = []  # (chunk bucket, lane fields), each as a real call would decide it
        for chunk_bucket in sorted({self._chunk_bucket(n) for n in longest}):
            variants.append((chunk_bucket, {}))
            if not self.lane_sizes:
                continue
            # the lane size follows the number of segments; for each number, the chunks most in
            # favour of the lane (as few rows as hold them, each as long as can be) show whether
            # any call with that many takes it
            C = min(self.prefill_chunk, chunk_bucket)
            per_row = -(-min(chunk_bucket, self.capacity) // C)
            floor = self._lane_width(chunk_bucket) // C + 1  # segments of the shortest long chunk
            for segments in range(1, self.batch * per_row + 1):
                inputs = self._empty_inputs()
                for row in range(self.batch):
                    take = min(per_row, segments - row * per_row)
                    if take > 0:
                        inputs.chunk_len[row] = min(max(take, floor) * C, chunk_bucket,
                                                    self.capacity)
                lane = self._long_lane(inputs, chunk_bucket)
                if lane and (chunk_bucket, lane) not in variants:
                    variants.append((chunk_bucket, lane))
        return [self._shape(chunk_bucket, m, sampling=kind, **lane)
                for kind in dict.fromkeys(sampling) for m in outputs
                for chunk_bucket, lane in variants]

    def warm_up(self, max_new_tokens: Sequence[int] = (), sampling: Sequence[str] = ("greedy",),
                *, workers: int | None = None, progress=None) -> list[dict]:
        """Compile ahead of time every program of ``turn_programs(max_new_tokens, sampling)``, so
        that no turn of that kind stops to compile (a many-layer program takes seconds).
        ``workers`` programs compile at once, in threads (default: 1 on a CPU, whose compiler
        already uses every core, and always 1 there while a persistent compilation cache is on;
        else up to 8, one per two host cores; 1: in the calling thread). Each is then run once
        with no row taking part: the trajectories, their cache entries and the counters stay as
        they were, so it may be called at any time. ``progress(i, n, shape, seconds)`` is called
        as each compile ends. Returns one dict per program (chunk_bucket, long_rows,
        max_new_bucket, sampling, seconds: its compile). Prefill-only programs (scoring, the
        replay after a failed call) are not included."""
        shapes = self.turn_programs(max_new_tokens, sampling)
        if workers is None:
            host_cores = os.cpu_count() or 2
            workers = 1 if jax.default_backend() == "cpu" else max(1, min(8, host_cores // 2))
        _positive_int("workers", workers)
        if workers > 1 and jax.default_backend() == "cpu" and persistent_cache_active():
            # conservative: a crash once seen there (a CPU cache write from a pool thread) was
            # traced to the process's memory-mapping limit, but concurrent CPU cache writes in
            # jax 0.11.2 have not been shown safe either
            workers = 1

        def idle_inputs(shape):
            inputs = self._empty_inputs()
            inputs.tokens = np.zeros((self.batch, shape.chunk_bucket), np.int32)
            if shape.long_rows:
                inputs.long_row = np.full(shape.lane_segments, self.batch, np.int32)
                inputs.long_offset = np.zeros(shape.lane_segments, np.int32)
            return inputs

        def compile_one(shape):  # compiling fills run_turn's cache: the call below reuses it
            t0 = time.perf_counter()
            with self._on_mesh():
                run_turn.lower(self.params, self._prepared, self.cache, idle_inputs(shape),
                               shape=shape).compile()
            return time.perf_counter() - t0

        seconds = [0.0] * len(shapes)
        if workers == 1:  # in this thread, as every other compile (no pool)
            for i, shape in enumerate(shapes):
                seconds[i] = compile_one(shape)
                if progress is not None:
                    progress(i + 1, len(shapes), shape, seconds[i])
        else:
            with concurrent.futures.ThreadPoolExecutor(workers, "lragent-warm-up") as pool:
                futures = {pool.submit(compile_one, shape): i for i, shape in enumerate(shapes)}
                for n, future in enumerate(concurrent.futures.as_completed(futures)):
                    i = futures[future]
                    seconds[i] = future.result()
                    if progress is not None:
                        progress(n + 1, len(shapes), shapes[i], seconds[i])
        for shape in shapes:  # the first run of each (its kernels load); nothing compiles
            try:
                with self._on_mesh():
                    cache, *outputs = run_turn(self.params, self._prepared, self.cache,
                                               idle_inputs(shape), shape=shape)
                jax.block_until_ready(outputs)
            except BaseException:
                self._recover_cache()
                raise
            self.cache = cache
        return [{"chunk_bucket": shape.chunk_bucket, "long_rows": shape.long_rows,
                 "max_new_bucket": shape.max_new_bucket, "sampling": shape.sampling,
                 "seconds": t} for shape, t in zip(shapes, seconds)]

    def _on_mesh(self):
        """The session's mesh set for a traced call (attention then runs per shard)."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _chunk_bucket(self, longest: int) -> int:
        """Padded chunk width of a turn: the next power of two (at least ``min_chunk_bucket``) up to
        ``prefill_chunk``; above it one width for every long chunk (the capacity rounded up to
        ``prefill_chunk``), whose prefill runs only the steps the longest row needs. With
        ``prefill_chunk <= min_chunk_bucket`` every chunk takes that one width."""
        width = bucket(longest, self.min_chunk_bucket)
        if width <= self.prefill_chunk and self.prefill_chunk > self.min_chunk_bucket:
            return width
        return -(-self.capacity // self.prefill_chunk) * self.prefill_chunk

    @property
    def long_lane_rows(self) -> int:
        """The most long chunks a call's lane takes: every row's (0 without the lane)."""
        return self.batch if self.lane_sizes else 0

    @property
    def lane_sizes(self) -> tuple[int, ...]:
        """The segments per step a packed long-prefill lane may take (an eighth, a quarter, half
        or all of the batch, at least one; see ``_long_lane``), () without the lane."""
        if not self.long_lane or self.batch < 2:
            return ()
        return tuple(sorted({max(self.batch // d, 1) for d in (8, 4, 2, 1)}))

    def _lane_width(self, chunk_bucket: int) -> int:
        """The short lane's width: chunks longer than this go to the long-prefill lane."""
        step = self.min_chunk_bucket
        return min(4 * step, chunk_bucket // step * step)

    def _long_lane(self, inputs: TurnInputs, chunk_bucket: int) -> dict:
        """The packed long-prefill lane for this call (``TurnShape`` fields; ``inputs.long_row``
        and ``long_offset`` set), or {} when it would not save a quarter of the prefill's tokens
        (see ``long_lane``). The long chunks are cut in segments of the call's prefill step; the
        segments per step are the lane size with the least ``steps x (size x step +
        LANE_STEP_TOKENS)``."""
        B, step, width = self.batch, self.min_chunk_bucket, self._lane_width(chunk_bucket)
        lengths = inputs.chunk_len
        long = [r for r in range(B) if lengths[r] > width]
        if not long or width < step or not self.lane_sizes:
            return {}
        C = min(self.prefill_chunk, chunk_bucket)
        segments = [(r, o) for r in long for o in range(0, int(lengths[r]), C)]
        size = min(self.lane_sizes, key=lambda p: (-(-len(segments) // p)
                                                   * (p * C + LANE_STEP_TOKENS), p))
        lane = dict(long_rows=size, short_step=step, short_width=width)
        if self._prefill_slots(lengths, C, long, **lane) > 0.75 * self._prefill_slots(lengths, C):
            return {}
        n = self._shape(chunk_bucket, 0, **lane).lane_segments
        inputs.long_row = np.full(n, B, np.int32)
        inputs.long_offset = np.zeros(n, np.int32)
        inputs.long_row[:len(segments)] = [r for r, _ in segments]
        inputs.long_offset[:len(segments)] = [o for _, o in segments]
        return lane

    def _prefill_slots(self, lengths, prefill_chunk: int, long=(), long_rows: int = 0,
                       short_step: int = 0, **_) -> int:
        """Row x position slots a prefill of chunks ``lengths`` [B] computes (padding included):
        every row over the longest in steps of ``prefill_chunk``, or with the packed lane of
        ``long_rows`` segments of ``prefill_chunk`` per step over the ``long`` rows' chunks and
        every row over the others' in steps of ``short_step``."""
        def extent(chunks, step, least=1):
            return max(-(-int(max(chunks, default=0)) // step), least) * step

        if not long_rows:
            return self.batch * extent(lengths, prefill_chunk)
        short = [n for r, n in enumerate(lengths) if r not in long]
        segments = sum(-(-int(lengths[r]) // prefill_chunk) for r in long)
        return (self.batch * extent(short, short_step, least=0)
                + max(-(-segments // long_rows), 1) * long_rows * prefill_chunk)

    def _empty_inputs(self) -> TurnInputs:
        B, V = self.batch, self.config.vocab_size
        return TurnInputs(
            tokens=None, chunk_len=np.zeros(B, np.int32), start=np.zeros(B, np.int32),
            agent=np.full(B, NO_ADAPTER, np.int32),
            processed0=self.processed.astype(np.int32), filled0=self.filled.astype(np.int32),
            max_new=np.ones(B, np.int32), temperature=np.zeros(B, np.float32),
            top_p=np.ones(B, np.float32), top_k=np.zeros(B, np.int32),
            stop_mask=np.zeros((B, V), bool), seed=np.zeros(B, np.uint32),
            counter=np.zeros(B, np.int32), long_row=np.zeros(0, np.int32),
            long_offset=np.zeros(0, np.int32))

    def _recover_cache(self) -> None:
        """After a failed call: if the donated cache was consumed, start from an empty cache; the
        next turn replays every row's history into it first (``_replay``)."""
        if any(x.is_deleted() for x in jax.tree.leaves(self.cache)):
            self.cache = init_cache(self.spec, self._cache_sharding)
            self.processed[:] = 0
            self.filled[:] = 0
            self._replay_pending = True

    def _replay(self) -> None:
        """Refill an empty cache: the i-th committed turn of every row, in order, as a
        prefill-only call through the agent that made it."""
        history = [list(h) for h in self._history]
        for i in range(max(map(len, history), default=0)):
            inputs = self._empty_inputs()
            chunks = {}
            for row, runs in enumerate(history):
                if i < len(runs) and runs[i][1] > runs[i][0]:
                    first, end, agent = runs[i]
                    chunks[row] = self.tokens[row][first:end]
                    inputs.start[row], inputs.chunk_len[row] = first, end - first
                    inputs.agent[row] = agent
            if not chunks:
                continue
            chunk_bucket = self._chunk_bucket(int(inputs.chunk_len.max()))
            inputs.tokens = np.zeros((self.batch, chunk_bucket), np.int32)
            for row, ids in chunks.items():
                inputs.tokens[row, :len(ids)] = ids
            shape = self._shape(chunk_bucket, 0)
            try:
                with self._on_mesh():
                    cache, _, _ = run_turn(self.params, self._prepared, self.cache, inputs,
                                           shape=shape)
                jax.block_until_ready(cache)
            except BaseException:
                self._recover_cache()
                raise
            self.cache = cache
            for row in chunks:
                first, end, agent = history[row][i]
                view = cache_view(agent)
                self.processed[row, view] = end
                self.filled[row] = max(self.filled[row], end)
        self._replay_pending = False

    def _finish_generation(self, turns, plans, chunk_len, out, n_out):
        results = {}
        eos = self._eos_ids()
        for row, plan in plans.items():
            settings = turns[row].settings
            gen = [int(t) for t in out[row, :n_out[row]]]
            fed = plan.length + len(gen) - 1  # tokens whose entries are in the cache
            reason = "length"
            if gen and gen[-1] in eos:
                gen, reason = gen[:-1], "eos"
            elif gen and self._stop_mask(settings)[gen[-1]]:
                reason = "stop"
            text = self.tokenizer.decode(gen)
            cut = stop_index(text, settings.stop)
            if cut is not None:
                text = text[:cut]
                keep = 0
                while keep < len(gen) and text.startswith(self.tokenizer.decode(gen[:keep + 1])):
                    keep += 1
                tail = text[len(self.tokenizer.decode(gen[:keep])):]
                gen = gen[:keep] + (self.tokenizer.encode(tail) if tail else [])
                fed = min(fed, plan.length + keep)
                reason = "stop"
            self.tokens[row].extend(gen)
            self._history[row].append((plan.start, fed, plan.agent))
            # fed >= length >= the previous filled, and entries past fed are stale after a cut
            self.processed[row, plan.view] = fed
            self.filled[row] = fed
            self.prefilled[row, plan.view] += int(chunk_len[row])
            self.decoded[row, plan.view] += int(n_out[row])
            results[row] = TurnResult(text=text, token_ids=gen, stop_reason=reason,
                                      prefilled=int(chunk_len[row]))
        return results

    def _finish_scoring(self, plans, hidden):
        hidden = np.asarray(hidden)
        results = {}
        for row, plan in plans.items():
            first = plan.length - 1 - plan.start  # chunk index predicting scored[0]
            n = len(plan.scored)
            # padded to a bucket so that one compiled scorer serves many segment lengths
            h = np.zeros((bucket(n, 16), hidden.shape[-1]), hidden.dtype)
            h[:n] = hidden[row, first:first + n]
            padded = np.zeros(len(h), np.int32)
            padded[:n] = plan.scored
            logprobs, match = sharding.fetch(_score_positions(self.params, h, padded,
                                                              config=self.config))
            self._history[row].append((plan.start, plan.total, plan.agent))
            self.processed[row, plan.view] = plan.total
            self.filled[row] = max(self.filled[row], plan.total)
            self.prefilled[row, plan.view] += plan.total - plan.start
            results[row] = TurnResult(text=self.tokenizer.decode(plan.scored),
                                      token_ids=list(plan.scored), stop_reason="scored",
                                      prefilled=plan.total - plan.start,
                                      logprobs=np.asarray(logprobs[:n]),
                                      greedy_match=np.asarray(match[:n]))
        return results


@dataclasses.dataclass(frozen=True)
class _RowPlan:
    """One row's part of a turn: its agent (index, -1 for none) and cache view, the tokens it
    appends (``add``) or scores, the trajectory length after the append (``length``) and after the
    scored tokens (``total``), tokens to generate at most, and where its prefill starts."""

    agent: int
    view: int
    add: list
    scored: list | None
    length: int
    total: int
    max_new: int
    start: int
