"""The multi-agent KV cache: one pytree, four sharing modes, memory accounting.

Storage (all preallocated at a fixed capacity S, written in place with scatters that XLA performs on
the donated buffer; never grown by concatenation):

    k, v     [L, Rb, S, K, H]   base keys / values        Rb = B·A (non_shared) or B
    lowrank  [L, Rl, S, R]      x·A of the v projection   Rl = B·A (base_shared) or B, or absent
    processed [B, A] int32      trajectory tokens each agent's view of row b holds
    filled    [B] int32         trajectory tokens whose shared entries are written

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
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.lora import shares_a
from lragent_jax.model import CacheArrays


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
        return self is ShareMode.NON_SHARED

    @property
    def lowrank_kind(self) -> str | None:
        return {ShareMode.BASE_SHARED: "per_agent",
                ShareMode.BASE_LOWRANK_SHARED: "shared"}.get(self)

    @property
    def bake_v(self) -> bool:
        return self.lowrank_kind is None

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
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"CacheSpec.{field} must be a positive int; got {value!r}")
        if self.rank < 0:
            raise ValueError(f"CacheSpec.rank must be >= 0; got {self.rank}")
        jnp.dtype(self.dtype)

    @classmethod
    def create(cls, config: ModelConfig, mode, *, num_agents: int, batch: int, capacity: int,
               lora: LoraConfig | None = None, dtype=jnp.bfloat16) -> "CacheSpec":
        mode = ShareMode.parse(mode)
        has_v = lora is not None and "v" in lora.targets
        rank = lora.rank if (has_v and mode.lowrank_kind is not None) else 0
        return cls(mode=mode, num_agents=num_agents, batch=batch, capacity=capacity,
                   num_layers=config.num_layers, kv_heads=config.num_kv_heads,
                   head_dim=config.head_dim, rank=rank, dtype=jnp.dtype(dtype).name)

    @property
    def base_rows(self) -> int:
        return self.batch * (self.num_agents if self.mode.base_per_agent else 1)

    @property
    def lowrank_rows(self) -> int:
        if self.rank == 0:
            return 0
        return self.batch * (self.num_agents if self.mode.lowrank_kind == "per_agent" else 1)

    def shapes(self) -> dict:
        S, L = self.capacity, self.num_layers
        out = {"k": (L, self.base_rows, S, self.kv_heads, self.head_dim),
               "v": (L, self.base_rows, S, self.kv_heads, self.head_dim)}
        if self.rank:
            out["lowrank"] = (L, self.lowrank_rows, S, self.rank)
        return out


@functools.partial(jax.tree_util.register_dataclass, data_fields=["arrays", "processed", "filled"],
                   meta_fields=["spec"])
@dataclasses.dataclass
class KVCache:
    arrays: CacheArrays
    processed: jax.Array  # [B, A] int32
    filled: jax.Array  # [B] int32
    spec: CacheSpec


def init_cache(spec: CacheSpec, sharding=None) -> KVCache:
    """A zero-filled cache (``sharding``: optional dict of leaf name -> jax.sharding.Sharding)."""
    dtype = jnp.dtype(spec.dtype)
    shapes = spec.shapes()
    sharding = sharding or {}

    def zeros(name, shape, dt):
        return jnp.zeros(shape, dt, device=sharding.get(name))

    arrays = CacheArrays(k=zeros("k", shapes["k"], dtype), v=zeros("v", shapes["v"], dtype),
                         lowrank=zeros("lowrank", shapes["lowrank"], dtype) if spec.rank else None)
    return KVCache(arrays=arrays,
                   processed=zeros("processed", (spec.batch, spec.num_agents), jnp.int32),
                   filled=zeros("filled", (spec.batch,), jnp.int32), spec=spec)


def abstract_cache(spec: CacheSpec) -> KVCache:
    """The cache's ShapeDtypeStructs, without allocating (``jax.eval_shape``)."""
    return jax.eval_shape(lambda: init_cache(spec))


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
    lowrank_copies = {"per_agent": num_agents, "shared": 1, None: 0}[mode.lowrank_kind]
    if not v_adapter:
        lowrank_copies = 0
    base = batch * base_copies * 2 * L * S * K * H * item
    lowrank = batch * lowrank_copies * L * S * rank * item
    lengths = (batch * num_agents + batch) * 4
    return {"base": base, "lowrank": lowrank, "lengths": lengths, "total": base + lowrank + lengths}


def measured_cache_bytes(cache: KVCache) -> dict:
    """Bytes of the actual cache pytree (works on arrays and on ShapeDtypeStructs)."""

    def nbytes(x):
        return 0 if x is None else int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize

    base = nbytes(cache.arrays.k) + nbytes(cache.arrays.v)
    lowrank = nbytes(cache.arrays.lowrank)
    lengths = nbytes(cache.processed) + nbytes(cache.filled)
    return {"base": base, "lowrank": lowrank, "lengths": lengths, "total": base + lowrank + lengths}
