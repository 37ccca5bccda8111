"""Host side of multi-agent trajectories sharing one cache.

A ``Session`` holds B independent trajectories (batch rows), each an append-only log of token ids,
and the device cache of one sharing mode. A turn appends text for some rows and lets each of those
rows' agents generate; the session decides what each agent must prefill under the mode and runs all
rows in one jitted call (rows may be at different agents' turns).

The host lengths (``processed[b, a]``, ``filled[b]``) are authoritative: after a stop string cuts an
output, they are rolled back to the tokens kept, and later turns simply overwrite the stale entries.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lragent_jax.cache import (CacheSpec, KVCache, ShareMode, analytic_cache_bytes,
                               check_mode_compatible, init_cache, measured_cache_bytes)
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.generate import TurnShape, bucket, run_turn
from lragent_jax.lora import NO_ADAPTER, validate_adapters


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
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop: tuple[str, ...] = ()  # stop strings (the output is cut before the first one)
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS ids

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1; got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off); got {self.top_k}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty; got {self.stop!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


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


class Session:
    """B trajectories, A agents, one cache of a sharing mode.

    Args:
      config, params, tokenizer: the base model.
      adapters, lora: multi-agent adapters (None: base model only, one agent view).
      mode: a ``ShareMode`` or its name.
      batch: number of trajectories (rows).
      capacity: cache positions per trajectory.
      cache_dtype: dtype of the cache (default: the params' dtype).
      attn_impl: attention implementation (None: best for the platform).
      prefill_chunk: tokens per prefill step inside a turn (bounds attention memory).
      min_chunk_bucket: smallest padded chunk length (fewer distinct compilations when larger).
      min_new_bucket: smallest output buffer of a turn (the decode loop stops at each row's limit,
        so a larger buffer only costs memory, and saves compilations).
      scan_unroll: layers per iteration of the layer scan (more: longer compile).
      seed: PRNG seed for sampling.
      cache_sharding: optional leaf name -> Sharding for the cache (multi-device).
    """

    def __init__(self, config: ModelConfig, params: dict, tokenizer, *, adapters: dict | None = None,
                 lora: LoraConfig | None = None, mode: str | ShareMode = "base_lowrank_shared",
                 batch: int = 1, capacity: int = 2048, cache_dtype=None,
                 attn_impl: str | None = None, prefill_chunk: int = 512, seed: int = 0,
                 cache_sharding: Mapping | None = None, min_chunk_bucket: int = 16,
                 min_new_bucket: int = 8, scan_unroll: int = 1):
        self.mode = ShareMode.parse(mode)
        if (adapters is None) != (lora is None):
            raise ValueError("pass adapters together with their LoraConfig (or neither)")
        if adapters is not None:
            validate_adapters(adapters, config, lora)
        check_mode_compatible(self.mode, lora, adapters)
        if not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be an int >= 1; got {batch!r}")
        if not isinstance(capacity, (int, np.integer)) or capacity < 2:
            raise ValueError(f"capacity must be an int >= 2; got {capacity!r}")
        if prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk must be a power of two; got {prefill_chunk}")
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.adapters, self.lora = adapters, lora
        self.num_agents = lora.num_agents if lora is not None else 1
        self.agent_names = tuple(lora.agents) if lora is not None else ("base",)
        cache_dtype = cache_dtype or params["embed"].dtype
        self.spec = CacheSpec.create(config, self.mode, num_agents=self.num_agents, batch=batch,
                                     capacity=capacity, lora=lora, dtype=cache_dtype)
        self.attn_impl = attn_impl
        self.prefill_chunk = prefill_chunk
        self.min_chunk_bucket = min_chunk_bucket
        self.min_new_bucket = min_new_bucket
        self.scan_unroll = scan_unroll
        self.cache: KVCache = init_cache(self.spec, cache_sharding)
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.processed = np.zeros((batch, self.num_agents), np.int64)
        self.filled = np.zeros((batch,), np.int64)
        self.prefilled = np.zeros((batch, self.num_agents), np.int64)
        self.decoded = np.zeros((batch, self.num_agents), np.int64)
        self._key = jax.random.key(seed)
        self._stop_masks: dict = {}
        self._token_strings: list[str] | None = None
        self.last_turn_seconds = 0.0

    # ------------------------------------------------------------------ trajectories
    @property
    def batch(self) -> int:
        return self.spec.batch

    @property
    def capacity(self) -> int:
        return self.spec.capacity

    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.batch:
            raise ValueError(f"trajectory {row} out of range; this session has rows 0..{self.batch - 1}")

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
        """Cut trajectory ``row`` to its first ``length`` tokens (cache entries past it go stale)."""
        self._check_row(row)
        length = max(0, min(length, len(self.tokens[row])))
        del self.tokens[row][length:]
        self.processed[row] = np.minimum(self.processed[row], length)
        self.filled[row] = min(self.filled[row], length)

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Start new trajectories in ``rows`` (default all); the cache buffers are reused."""
        for row in (range(self.batch) if rows is None else rows):
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
        return self.lora.agent_index(agent)

    def _all_token_strings(self) -> list[str]:
        if self._token_strings is None:
            n = min(self.config.vocab_size, getattr(self.tokenizer, "vocab_size", self.config.vocab_size))
            strings = [self.tokenizer.decode([i]) for i in range(n)]
            self._token_strings = strings + [""] * (self.config.vocab_size - n)
        return self._token_strings

    def _stop_mask(self, settings: GenerationSettings) -> np.ndarray:
        key = (settings.stop, settings.stop_token_ids)
        if key not in self._stop_masks:
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

    def turn(self, turns: Mapping[int, Turn]) -> dict[int, TurnResult]:
        """Run one turn for the given rows (others stay untouched) in one jitted call."""
        if not turns:
            return {}
        B, S, A = self.batch, self.capacity, self.num_agents
        plans = {}
        for row, turn in turns.items():
            self._check_row(row)
            agent = self._agent_index(turn.agent)
            view = max(agent, 0)
            add = (self.tokenizer.encode(turn.append) if turn.append else []) + list(turn.append_ids)
            scored = list(turn.score_tokens) if turn.score_tokens is not None else None
            length = len(self.tokens[row]) + len(add)
            total = length + (len(scored) if scored is not None else 0)
            if length == 0:
                raise ValueError(f"trajectory {row} is empty: append a prompt before a turn")
            max_new = 0 if scored is not None else turn.settings.max_new_tokens
            if scored is not None and not scored:
                raise ValueError(f"trajectory {row}: score_tokens is empty")
            if total + max(max_new - 1, 0) > S:
                raise CapacityError(
                    f"trajectory {row}: length {total} plus up to {max_new} new tokens exceeds the "
                    f"cache capacity {S}; nothing was changed (start a session with a larger "
                    "capacity)")
            bad = [t for t in add + (scored or []) if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"trajectory {row}: token ids {bad[:5]} out of range for vocab size "
                                 f"{self.config.vocab_size}")
            plans[row] = (agent, view, add, scored, length, total, max_new)
        kinds = {p[3] is not None for p in plans.values()}
        if len(kinds) > 1:
            raise ValueError("a turn either scores tokens on every row or generates on every row")
        scoring = kinds.pop()

        # all checks passed: mutate host state
        starts = np.zeros(B, np.int32)
        chunk_len = np.zeros(B, np.int32)
        agents = np.full(B, NO_ADAPTER, np.int32)
        max_new = np.zeros(B, np.int32)
        temperature = np.zeros(B, np.float32)
        top_p = np.ones(B, np.float32)
        top_k = np.zeros(B, np.int32)
        stop_mask = np.zeros((B, self.config.vocab_size), bool)
        chunks = {}
        for row, (agent, view, add, scored, length, total, row_max_new) in plans.items():
            self.tokens[row].extend(add)
            if scored is not None:
                self.tokens[row].extend(scored)
            need = length - 1  # the last context token must run to predict what follows
            start = self.processed[row, view] if self.mode.per_agent_view else self.filled[row]
            start = int(min(start, need))
            chunks[row] = self.tokens[row][start:total]
            starts[row], chunk_len[row], agents[row] = start, total - start, agent
            max_new[row] = max(row_max_new, 1)
            settings = turns[row].settings
            temperature[row], top_p[row], top_k[row] = (settings.temperature, settings.top_p,
                                                        settings.top_k)
            stop_mask[row] = self._stop_mask(settings)
        sampling = "greedy"
        if not scoring and any(turns[r].settings.temperature > 0 for r in plans):
            filtered = any(turns[r].settings.top_p < 1 or turns[r].settings.top_k > 0 for r in plans)
            sampling = "sample_filtered" if filtered else "sample"
        chunk_bucket = bucket(int(chunk_len.max()), self.min_chunk_bucket)
        prefill_chunk = min(self.prefill_chunk, chunk_bucket)
        tokens = np.zeros((B, chunk_bucket), np.int32)
        for row, ids in chunks.items():
            tokens[row, :len(ids)] = ids
        shape = TurnShape(config=self.config, spec=self.spec, chunk_bucket=chunk_bucket,
                          prefill_chunk=prefill_chunk,
                          max_new_bucket=0 if scoring else bucket(int(max_new.max()),
                                                                       self.min_new_bucket),
                          sampling=sampling, attn_impl=self.attn_impl, return_hidden=scoring,
                          unroll=self.scan_unroll)
        self._key, key = jax.random.split(self._key)
        t0 = time.perf_counter()
        result = run_turn(self.params, self.adapters, self.cache, tokens, chunk_len, starts, agents,
                          self.processed.astype(np.int32), self.filled.astype(np.int32), max_new,
                          temperature, top_p, top_k, stop_mask, key, shape=shape)
        self.cache = result[0]
        if scoring:
            return self._finish_scoring(plans, result, starts)
        out, n_out = jax.device_get(result[1:])
        self.last_turn_seconds = time.perf_counter() - t0
        return self._finish_generation(turns, plans, starts, chunk_len, out, n_out)

    def _finish_generation(self, turns, plans, starts, chunk_len, out, n_out):
        results = {}
        eos = self._eos_ids()
        for row, (agent, view, add, _, length, _, _) in plans.items():
            settings = turns[row].settings
            gen = [int(t) for t in out[row, :n_out[row]]]
            fed = length + len(gen) - 1  # tokens whose entries are in the cache
            reason = "length"
            if gen and gen[-1] in eos:
                gen, reason = gen[:-1], "eos"
            elif gen and self._stop_mask(settings)[gen[-1]]:
                reason = "stop"
            text = self.tokenizer.decode(gen)
            cut = min((i for i in (text.find(s) for s in settings.stop) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                keep = 0
                while keep < len(gen) and text.startswith(self.tokenizer.decode(gen[:keep + 1])):
                    keep += 1
                tail = text[len(self.tokenizer.decode(gen[:keep])):]
                gen = gen[:keep] + (self.tokenizer.encode(tail) if tail else [])
                fed = min(fed, length + keep)
                reason = "stop"
            self.tokens[row].extend(gen)
            # fed >= length >= the previous filled, and entries past fed are stale after a cut
            self.processed[row, view] = fed
            self.filled[row] = fed
            self.prefilled[row, view] += int(chunk_len[row])
            self.decoded[row, view] += int(n_out[row])
            results[row] = TurnResult(text=text, token_ids=gen, stop_reason=reason,
                                      prefilled=int(chunk_len[row]))
        return results

    def _finish_scoring(self, plans, result, starts):
        _, _, hidden = result
        hidden = np.asarray(jax.device_get(hidden))
        results = {}
        for row, (agent, view, add, scored, length, total, _) in plans.items():
            first = length - 1 - int(starts[row])  # chunk index predicting scored[0]
            n = len(scored)
            # padded to a bucket so that one compiled scorer serves many segment lengths
            h = np.zeros((bucket(n, 16), hidden.shape[-1]), hidden.dtype)
            h[:n] = hidden[row, first:first + n]
            target = np.asarray(scored, np.int32)
            padded = np.zeros(len(h), np.int32)
            padded[:n] = target
            logprobs, match = jax.device_get(_score_positions(self.params, h, padded,
                                                              config=self.config))
            self.processed[row, view] = total
            self.filled[row] = max(self.filled[row], total)
            self.prefilled[row, view] += total - int(starts[row])
            results[row] = TurnResult(text=self.tokenizer.decode(scored), token_ids=list(scored),
                                      stop_reason="scored", prefilled=total - int(starts[row]),
                                      logprobs=np.asarray(logprobs[:n]),
                                      greedy_match=np.asarray(match[:n]))
        return results
