"""How many cache rows fit in a device-memory budget, per sharing mode.

The cache of a session is one preallocated buffer per leaf with ``rows`` trajectories of ``capacity``
positions each (``cache.py``), so its bytes are linear in the row count and every row costs the
same: ``analytic_cache_bytes(batch=1)`` (the accounting the memory part reports). A turn also needs
working memory per row, which is estimated here (``activation_bytes_per_row``), and a share of the
budget is kept back as headroom for XLA's temporaries and allocator fragmentation.

Why one capacity for every row: a row's positions are a slice of the per-layer buffer
``[rows, capacity, ...]``, written in place by the jitted turn, so all rows have the buffer's length.
What it wastes: ``capacity - length`` positions of every trajectory shorter than the longest one the
session must hold (in bytes, that share of ``cache_bytes_per_row``). Sizing rows per task would need
a paged cache (blocks of positions handed to trajectories as they grow), which this layout is not.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lragent_jax.cache import ShareMode, analytic_cache_bytes
from lragent_jax.config import LoraConfig, ModelConfig

GiB = 1 << 30


def device_free_bytes(device=None) -> int | None:
    """Bytes the device can still allocate (``bytes_limit - bytes_in_use`` of its memory stats), or
    None where the platform reports none (the CPU)."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats or "bytes_in_use" not in stats:
        return None
    return int(stats["bytes_limit"] - stats["bytes_in_use"])


def activation_bytes_per_row(config: ModelConfig, *, capacity: int, prefill_chunk: int,
                             dtype=jnp.bfloat16, attention_scores: bool = False) -> int:
    """An allowance (not a measurement) for one row's working memory in a turn, beyond its cache.

    - one prefill chunk of C = min(prefill_chunk, capacity) tokens through one layer: residual
      input, normed input, q, k, v, attention output and the MLP's gate, up and product,
      ``C·(3·D + 2·N·H + 2·K·H + 3·F)`` values of ``dtype``;
    - with ``attention_scores`` (the plain-JAX reference attention, which builds them; the fused
      kernels do not): scores and their exponentials in float32, ``2·N·C·capacity·4`` bytes;
    - sampling: float32 logits and two vocabulary-sized work arrays (scaled, sorted), and the
      boolean stop mask: ``V·(3·4 + 1)`` bytes.
    """
    item = jnp.dtype(dtype).itemsize
    D, F, N, K, H = (config.hidden_size, config.intermediate_size, config.num_heads,
                     config.num_kv_heads, config.head_dim)
    chunk = min(prefill_chunk, capacity)
    layer = chunk * (3 * D + 2 * N * H + 2 * K * H + 3 * F) * item
    scores = 2 * N * chunk * capacity * 4 if attention_scores else 0
    sampling = config.vocab_size * (3 * 4 + 1)
    return int(layer + scores + sampling)


@dataclasses.dataclass(frozen=True)
class RowBudget:
    """The row count a budget affords for one mode and capacity, and how it was reckoned."""

    rows: int
    mode: str
    capacity: int
    budget_bytes: int
    budget_source: str
    cache_bytes_per_row: int  # analytic_cache_bytes(batch=1)["total"]
    activation_bytes_per_row: int
    headroom_bytes: int

    @property
    def bytes_per_row(self) -> int:
        return self.cache_bytes_per_row + self.activation_bytes_per_row

    @property
    def cache_bytes(self) -> int:
        """Analytic bytes of the cache of ``rows`` rows."""
        return self.rows * self.cache_bytes_per_row

    def describe(self) -> str:
        return (f"{self.rows} rows of mode {self.mode} at capacity {self.capacity} fit "
                f"{_gib(self.budget_bytes)} ({self.budget_source}): per row "
                f"{_gib(self.cache_bytes_per_row)} cache + {_gib(self.activation_bytes_per_row)} "
                f"activation allowance, {_gib(self.headroom_bytes)} headroom kept back")


def plan_rows(config: ModelConfig, mode, *, capacity: int, lora: LoraConfig | None = None,
              cache_dtype=jnp.bfloat16, budget_bytes: int | None = None, prefill_chunk: int = 512,
              attention_scores: bool | None = None, headroom: float = 0.1,
              max_rows: int | None = None, budget_source: str = "given") -> RowBudget:
    """The largest row count whose cache (analytic bytes) plus activation allowance fits the budget.

    ``budget_bytes``: None takes what the device has free now (call it after the weights are on the
    device); the CPU reports no memory, so there a budget must be given. ``attention_scores``: None
    counts the reference attention's score tensors when the platform's default attention is the
    reference (the CPU). ``headroom``: share of the budget kept back. ``max_rows``: an upper bound
    (e.g. the number of episodes). ``budget_source``: how a given budget was chosen, for the
    report. Raises ValueError when not even one row fits, naming the budget,
    the mode and the bytes one row needs.
    """
    mode = ShareMode.parse(mode)
    if not isinstance(capacity, int) or capacity < 2:
        raise ValueError(f"capacity must be an int >= 2; got {capacity!r}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1); got {headroom}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1; got {max_rows}")
    if budget_bytes is None:
        budget_bytes = device_free_bytes()
        if budget_bytes is None:
            raise ValueError(f"the {jax.default_backend()} device reports no memory statistics, so "
                             "there is no default budget: pass budget_bytes (e.g. 2 << 30)")
        source = "device free memory"
    else:
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be > 0; got {budget_bytes}")
        source = budget_source
    if attention_scores is None:
        from pallas_kernels.flash_lora_attention.api import default_implementation

        attention_scores = default_implementation() == "reference"
    num_agents = lora.num_agents if lora is not None else 1
    has_v = lora is not None and "v" in lora.targets
    rank = lora.rank if has_v and mode.factored_v else 0
    cache = analytic_cache_bytes(config, mode, num_agents=num_agents, capacity=capacity, rank=rank,
                                 batch=1, dtype=cache_dtype, v_adapter=rank > 0)["total"]
    activation = activation_bytes_per_row(config, capacity=capacity, prefill_chunk=prefill_chunk,
                                          dtype=cache_dtype, attention_scores=attention_scores)
    kept = int(budget_bytes * headroom)
    rows = (budget_bytes - kept) // (cache + activation)
    if rows < 1:
        raise ValueError(
            f"a memory budget of {_gib(budget_bytes)} ({budget_bytes} bytes, {source}) fits no row "
            f"of mode {mode.value!r} at capacity {capacity}: one row needs {cache + activation} "
            f"bytes ({cache} cache + {activation} activation allowance) and {kept} bytes "
            f"({headroom:.0%}) are kept as headroom; give a larger budget or a smaller capacity")
    if max_rows is not None:
        rows = min(rows, max_rows)
    return RowBudget(rows=int(rows), mode=mode.value, capacity=capacity,
                     budget_bytes=int(budget_bytes), budget_source=source,
                     cache_bytes_per_row=int(cache), activation_bytes_per_row=activation,
                     headroom_bytes=kept)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / (1 << 20):.1f} MiB"
