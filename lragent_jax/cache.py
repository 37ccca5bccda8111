"""The multi-agent KV cache, in one home: storage, sharing-mode rules, the write plan of a chunk, the
per-layer write, and memory accounting.

Storage (all preallocated at a fixed capacity S, one array per layer, written in place with scatters
that XLA performs on the donated buffers; never grown by concatenation):

    k[l], v[l]   [Rb, S, K, H]   base keys / values of layer l     Rb = B·A (non_shared) or B
    lowrank[l]   [Rl, S, R]      x·A of layer l's v projection      Rl = B·A (base_shared) or B,
                                                                    or absent
    processed    [B, A] int32    trajectory tokens each agent's view of row b holds
    filled       [B] int32       trajectory tokens whose shared entries are written

One buffer per layer (not a stacked [L, ...] array) because the decode loop reads every layer once
per token: slicing a layer out of a stacked, loop-carried buffer makes XLA copy it (see DESIGN.md).

Row b of agent a lives at cache row b·A + a in per-agent leaves (batch-major, so sharding the rows
over a data axis keeps each trajectory's agents together).

| mode                 | base k/v       | low-rank     | v adapter          | a turn prefills from |
|----------------------|----------------|--------------|--------------------|----------------------|
| non_shared           | per agent      | none         | baked into v       | processed[b, a]      |
| fully_shared         | one            | none         | writer's, baked    | filled[b]            |
| base_shared          | one            | per agent    | factored, own B    | processed[b, a]      |
| base_lowrank_shared  | one            | one (shared A)| factored, own B   | filled[b]            |

A leaf shared by all agents is written only at positions >= filled (entries another agent already
wrote are reused); a per-agent leaf is always written.

Dimension alphabet as in ``config.py``: B batch rows, T new tokens, S capacity, K kv heads,
H head dim, R rank, A agents, L layers.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.lora import shares_a

CACHE_DTYPES = ("float32", "bfloat16", "float16")


class ShareMode(str, enum.Enum):
    NON_SHARED = "non_shared"
    FULLY_SHARED = "fully_shared"
    BASE_SHARED = "base_shared"
    BASE_LOWRANK_SHARED = "base_lowrank_shared"

    @classmethod
    def parse(cls, mode: "str | ShareMode") -> "ShareMode":
        if isinstance(mode, ShareMode):
            return mode
        try:
            return cls(mode)
        except ValueError:
            raise ValueError(f"unknown share mode {mode!r}; allowed: "
                             f"{[m.value for m in cls]}") from None

    @property
    def base_per_agent(self) -> bool:
        """Every agent has its own base k/v rows."""
        return self is ShareMode.NON_SHARED

    @property
    def lowrank_per_agent(self) -> bool:
        """Every agent has its own low-rank rows (its own x·A_i)."""
        return self is ShareMode.BASE_SHARED

    @property
    def factored_v(self) -> bool:
        """The v adapter stays factored (x·A in the low-rank leaf, B applied inside attention)
        instead of being baked into the cached values."""
        return self in (ShareMode.BASE_SHARED, ShareMode.BASE_LOWRANK_SHARED)

    @property
    def per_agent_view(self) -> bool:
        """Each agent must process every token itself (it has its own leaf to fill)."""
        return self in (ShareMode.NON_SHARED, ShareMode.BASE_SHARED)


ALL_MODES = tuple(ShareMode)


def check_mode_compatible(mode: ShareMode | str, lora: LoraConfig | None,
                          adapters: dict | None) -> None:
    """Enforce the sharing rules: no k adapters in a shared cache; base+LR sharing needs one A."""
    mode = ShareMode.parse(mode)
    if lora is None:
        return
    if mode is not ShareMode.NON_SHARED and "k" in lora.targets:
        raise ValueError(
            f"share mode {mode.value!r} shares a cache across agents, so adapters on k are refused "
            "(a key adapter sits before RoPE and cannot be factored out of the score); "
            f"targets are {list(lora.targets)}: drop 'k' or use share mode 'non_shared'")
    if mode is ShareMode.BASE_LOWRANK_SHARED and adapters is not None and "v" in adapters:
        if not shares_a(adapters, lora):
            raise ValueError(
                "share mode 'base_lowrank_shared' needs adapters whose A matrices are identical "
                "across agents (shared-A); these adapters' A differ: train them with shared A or "
                "use share mode 'base_shared'")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Static description of a cache (hashable: it is a jit static argument)."""

    mode: ShareMode
    num_agents: int
    batch: int
    capacity: int
    num_layers: int
    kv_heads: int
    head_dim: int
    rank: int  # 0 when there is no low-rank leaf
    dtype: str = "bfloat16"

    def __post_init__(self):
        object.__setattr__(self, "mode", ShareMode.parse(self.mode))
        for field in ("num_agents", "batch", "capacity", "num_layers", "kv_heads", "head_dim"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"CacheSpec.{field} must be a positive int; got {value!r}")
            object.__setattr__(self, field, int(value))
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) \
                or self.rank < 0:
            raise ValueError(f"CacheSpec.rank must be an int >= 0; got {self.rank!r}")
        try:
            name = jnp.dtype(self.dtype).name
        except TypeError:
            name = repr(self.dtype)
        if name not in CACHE_DTYPES:
            raise ValueError(f"cache dtype {name} is not supported; allowed: {list(CACHE_DTYPES)}")
        object.__setattr__(self, "dtype", name)

    @classmethod
    def create(cls, config: ModelConfig, mode, *, num_agents: int, batch: int, capacity: int,
               lora: LoraConfig | None = None, dtype=jnp.bfloat16) -> "CacheSpec":
        mode = ShareMode.parse(mode)
        has_v = lora is not None and "v" in lora.targets
        rank = lora.rank if (has_v and mode.factored_v) else 0
        return cls(mode=mode, num_agents=num_agents, batch=batch, capacity=capacity,
                   num_layers=config.num_layers, kv_heads=config.num_kv_heads,
                   head_dim=config.head_dim, rank=rank, dtype=dtype)

    @property
    def base_rows(self) -> int:
        return self.batch * (self.num_agents if self.mode.base_per_agent else 1)

    @property
    def lowrank_rows(self) -> int:
        if self.rank == 0:
            return 0
        return self.batch * (self.num_agents if self.mode.lowrank_per_agent else 1)

    def layer_shapes(self) -> dict:
        """Shapes of one layer's buffers."""
        S = self.capacity
        out = {"k": (self.base_rows, S, self.kv_heads, self.head_dim),
               "v": (self.base_rows, S, self.kv_heads, self.head_dim)}
        if self.rank:
            out["lowrank"] = (self.lowrank_rows, S, self.rank)
        return out


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "lowrank"],
                   meta_fields=[])
@dataclasses.dataclass
class CacheArrays:
    """Per-layer cache storage: k[l], v[l] [Rows, S, K, H]; lowrank[l] [Rows, S, R] (or None)."""

    k: tuple
    v: tuple
    lowrank: tuple | None

    def layer(self, index: int) -> "LayerCache":
        return LayerCache(self.k[index], self.v[index],
                          None if self.lowrank is None else self.lowrank[index])

    @classmethod
    def from_layers(cls, layers: list["LayerCache"]) -> "CacheArrays":
        lowrank = None if layers[0].lowrank is None else tuple(c.lowrank for c in layers)
        return cls(tuple(c.k for c in layers), tuple(c.v for c in layers), lowrank)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "lowrank"],
                   meta_fields=[])
@dataclasses.dataclass
class LayerCache:
    """One layer's buffers: k, v [Rows, S, K, H]; lowrank [Rows, S, R] or None."""

    k: Float[Array, "Rows S K H"]
    v: Float[Array, "Rows S K H"]
    lowrank: Float[Array, "Rows S R"] | None


@functools.partial(jax.tree_util.register_dataclass, data_fields=["arrays", "processed", "filled"],
                   meta_fields=["spec"])
@dataclasses.dataclass
class KVCache:
    arrays: CacheArrays
    processed: Int[Array, "B A"]
    filled: Int[Array, "B"]
    spec: CacheSpec


def init_cache(spec: CacheSpec, sharding=None) -> KVCache:
    """A zero-filled cache (``sharding``: optional dict of leaf name -> jax.sharding.Sharding;
    "k", "v", "lowrank" apply to every layer's buffer)."""
    dtype = jnp.dtype(spec.dtype)
    shapes = spec.layer_shapes()
    sharding = sharding or {}

    def zeros(name, shape, dt):
        return jnp.zeros(shape, dt, device=sharding.get(name))

    L = spec.num_layers
    arrays = CacheArrays(
        k=tuple(zeros("k", shapes["k"], dtype) for _ in range(L)),
        v=tuple(zeros("v", shapes["v"], dtype) for _ in range(L)),
        lowrank=tuple(zeros("lowrank", shapes["lowrank"], dtype) for _ in range(L))
        if spec.rank else None)
    return KVCache(arrays=arrays,
                   processed=zeros("processed", (spec.batch, spec.num_agents), jnp.int32),
                   filled=zeros("filled", (spec.batch,), jnp.int32), spec=spec)


def abstract_cache(spec: CacheSpec) -> KVCache:
    """The cache's ShapeDtypeStructs, without allocating (``jax.eval_shape``)."""
    return jax.eval_shape(lambda: init_cache(spec))


# ----------------------------------------------------------------------------- the write plan


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["positions", "q_offset", "kv_lengths", "base_write",
                                "lowrank_write", "kv_row", "lowrank_row"],
                   meta_fields=[])
@dataclasses.dataclass
class ChunkPlan:
    """Where a chunk of new tokens sits in the cache and which cache entries it writes.

    positions [B, T]: absolute position of each new token. q_offset [B]: position of token 0.
    kv_lengths [B]: keys visible after this chunk is written. base_write / lowrank_write [B, T]:
    destination position of each token's base k/v and low-rank entries, or S (the capacity) to
    skip the write (padding, or entries another agent already wrote to a shared leaf).
    kv_row / lowrank_row [B]: the cache row each batch row reads and writes (None without a
    cache, or for lowrank_row when the cache has no low-rank leaf).
    """

    positions: Int[Array, "B T"]
    q_offset: Int[Array, "B"]
    kv_lengths: Int[Array, "B"]
    base_write: Int[Array, "B T"] | None
    lowrank_write: Int[Array, "B T"] | None
    kv_row: Int[Array, "B"] | None
    lowrank_row: Int[Array, "B"] | None

    @classmethod
    def full_sequence(cls, batch: int, length: int, lengths: Int[Array, "B"] | None = None
                      ) -> "ChunkPlan":
        """Right-padded rows from position 0, no cache (``lengths`` valid tokens per row)."""
        if lengths is None:
            lengths = jnp.full((batch,), length, jnp.int32)
        zeros = jnp.zeros((batch,), jnp.int32)
        return cls(positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                              (batch, length)),
                   q_offset=zeros, kv_lengths=lengths.astype(jnp.int32), base_write=None,
                   lowrank_write=None, kv_row=None, lowrank_row=None)


def cache_rows(spec: CacheSpec, view: Int[Array, "B"]) -> tuple[Array, Array]:
    """(base row, low-rank row) [B] that each batch row reads and writes, given the agent whose
    view it runs (``view`` >= 0)."""
    batch_ids = jnp.arange(spec.batch, dtype=jnp.int32)
    kv_row = batch_ids * spec.num_agents + view if spec.mode.base_per_agent else batch_ids
    lowrank_row = (batch_ids * spec.num_agents + view if spec.mode.lowrank_per_agent
                   else batch_ids)
    return kv_row, lowrank_row


def plan_chunk(spec: CacheSpec, positions: Int[Array, "B T"], valid: Bool[Array, "B T"],
               filled0: Int[Array, "B"], kv_row: Int[Array, "B"], lowrank_row: Int[Array, "B"],
               kv_lengths: Int[Array, "B"], q_offset: Int[Array, "B"]) -> ChunkPlan:
    """The plan of one chunk: writes go to ``positions`` where the token is ``valid`` and, for a
    leaf shared by all agents, not already written by another agent (position >= ``filled0``);
    every other write goes to S (dropped)."""
    S = spec.capacity
    fresh = positions >= filled0[:, None]
    base_ok = valid & (fresh | spec.mode.base_per_agent)
    lowrank_ok = valid & (fresh | spec.mode.lowrank_per_agent)
    return ChunkPlan(positions=positions, q_offset=q_offset, kv_lengths=kv_lengths,
                     base_write=jnp.where(base_ok, positions, S),
                     lowrank_write=jnp.where(lowrank_ok, positions, S) if spec.rank else None,
                     kv_row=kv_row, lowrank_row=lowrank_row if spec.rank else None)


def write_layer(cache: LayerCache, plan: ChunkPlan, k: Float[Array, "B T K H"],
                v: Float[Array, "B T K H"], lowrank: Float[Array, "B T R"] | None) -> LayerCache:
    """Write a chunk's entries into one layer's buffers, in place (destinations S are dropped)."""
    rows = plan.kv_row[:, None]
    new_k = cache.k.at[rows, plan.base_write].set(k.astype(cache.k.dtype), mode="drop")
    new_v = cache.v.at[rows, plan.base_write].set(v.astype(cache.v.dtype), mode="drop")
    new_lowrank = cache.lowrank
    if cache.lowrank is not None:
        if lowrank is None:
            raise ValueError("this cache holds a low-rank leaf but the chunk brought no x·A")
        new_lowrank = cache.lowrank.at[plan.lowrank_row[:, None], plan.lowrank_write].set(
            lowrank.astype(cache.lowrank.dtype), mode="drop")
    return LayerCache(new_k, new_v, new_lowrank)


def advance_lengths(spec: CacheSpec, processed0: Int[Array, "B A"], filled0: Int[Array, "B"],
                    view: Int[Array, "B"], active: Bool[Array, "B"], fed: Int[Array, "B"]):
    """(processed, filled) after a turn that fed the row's agent ``fed`` trajectory tokens."""
    mine = jnp.arange(spec.num_agents)[None, :] == view[:, None]
    processed = jnp.where(active[:, None] & mine, fed[:, None], processed0)
    filled = jnp.where(active, jnp.maximum(filled0, fed), filled0)
    return processed, filled


# ----------------------------------------------------------------------------- memory accounting


def analytic_cache_bytes(config: ModelConfig, mode, *, num_agents: int, capacity: int, rank: int,
                         batch: int = 1, dtype=jnp.bfloat16, v_adapter: bool = True) -> dict:
    """Bytes each part of a mode's cache needs, from the formulas (not from arrays).

    base = 2·L·S·K·H·itemsize per copy (one copy per agent in non_shared);
    lowrank = L·S·R·itemsize per copy (one per agent in base_shared, one in base_lowrank_shared);
    lengths = (B·A + B)·4.
    """
    mode = ShareMode.parse(mode)
    item = jnp.dtype(dtype).itemsize
    L, K, H, S = config.num_layers, config.num_kv_heads, config.head_dim, capacity
    base_copies = num_agents if mode.base_per_agent else 1
    lowrank_copies = 0
    if mode.factored_v and v_adapter:
        lowrank_copies = num_agents if mode.lowrank_per_agent else 1
    base = batch * base_copies * 2 * L * S * K * H * item
    lowrank = batch * lowrank_copies * L * S * rank * item
    lengths = (batch * num_agents + batch) * 4
    return {"base": base, "lowrank": lowrank, "lengths": lengths, "total": base + lowrank + lengths}


def measured_cache_bytes(cache: KVCache) -> dict:
    """Bytes of the actual cache pytree (works on arrays and on ShapeDtypeStructs)."""

    def nbytes(leaves):
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(leaves))

    base = nbytes(cache.arrays.k) + nbytes(cache.arrays.v)
    lowrank = nbytes(cache.arrays.lowrank)
    lengths = nbytes(cache.processed) + nbytes(cache.filled)
    return {"base": base, "lowrank": lowrank, "lengths": lengths, "total": base + lowrank + lengths}
