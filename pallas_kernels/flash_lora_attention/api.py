"""Public entry point of Flash-LoRA-Attention: validation, defaults and backend dispatch.

Forward only: the Pallas backends define no gradient. Training uses ``implementation="reference"``,
which is plain JAX and differentiable.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from pallas_kernels.flash_lora_attention.reference import flash_lora_attention_reference

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
KERNEL_HEAD_DIMS = (64, 128, 256)
KERNEL_MAX_RANK = 128
IMPLEMENTATIONS = ("reference", "triton", "mosaic_tpu", "cudnn")


def kernel_limits_problem(head_dim: int, rank: int, dtype) -> str | None:
    """What the Pallas kernels (Triton and Mosaic alike) cannot take: head dim, rank, dtype."""
    if head_dim not in KERNEL_HEAD_DIMS:
        return f"head_dim H={head_dim} is not one of {KERNEL_HEAD_DIMS}"
    if rank > KERNEL_MAX_RANK:
        return f"rank R={rank} is above {KERNEL_MAX_RANK}"
    if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {jnp.dtype(dtype).name} is not float32, bfloat16 or float16"
    return None

# backend name -> module path; each module exposes `unsupported_reason(**shape_info) -> str | None`
# and `flash_lora_attention(...)` with the reference's keyword arguments plus `block_sizes`,
# `interpret`.
_BACKEND_MODULES = {
    "triton": "pallas_kernels.flash_lora_attention.triton_gpu",
    "mosaic_tpu": "pallas_kernels.flash_lora_attention.mosaic_tpu",
    "cudnn": "pallas_kernels.flash_lora_attention.cudnn",
}
_PLATFORM_DEFAULT = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "mosaic_tpu"}


@dataclasses.dataclass(frozen=True)
class DispatchThresholds:
    """Which backend ``implementation=None`` picks on an NVIDIA GPU, by the call's shape.

    T <= ``decode_max_t``: the Flash-LoRA split-K decode kernel (reads the cache once, no V + C·B);
    T >= ``cudnn_min_t`` (``cudnn_min_t_plain`` without an adapter term): cuDNN's fused attention,
    the adapter term materialised per row; in between: the Flash-LoRA prefill kernel. Measured on
    the H200 (NOTES.md, "dispatch"): a chunk at the end of a 16k cache, R=16, takes 0.334 ms
    through cuDNN against 0.411 ms in the prefill kernel at T=64, 0.331 / 0.439 at T=256,
    1.93 / 2.91 at T=4096; T in 17..63 was not measured and stays on the kernel.
    """

    decode_max_t: int = 16
    cudnn_min_t: int = 64
    cudnn_min_t_plain: int = 64


GPU_THRESHOLDS = DispatchThresholds()


def select_implementation(*, platform: str, t_len: int, has_lowrank: bool,
                          per_token_index: bool = False,
                          thresholds: DispatchThresholds = GPU_THRESHOLDS) -> str:
    """The backend ``implementation=None`` tries first for a call of this shape on ``platform``
    (it falls back to "reference" when that backend cannot take the call)."""
    if per_token_index:
        return "reference"  # one agent per query row: only the reference takes it
    if platform in ("gpu", "cuda"):
        if t_len <= thresholds.decode_max_t:
            return "triton"
        if t_len >= (thresholds.cudnn_min_t if has_lowrank else thresholds.cudnn_min_t_plain):
            return "cudnn"
        return "triton"
    return _PLATFORM_DEFAULT.get(platform, "reference")


class UnsupportedError(ValueError):
    """The requested implementation cannot run this call (shape, dtype or platform)."""


def _is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def _check_index_values(name: str, index, upper: int, allow_negative: bool) -> None:
    if not _is_concrete(index):
        return
    values = np.asarray(index)
    lower = -1 if allow_negative else 0
    bad = (values < lower) | (values >= upper)
    if bad.any():
        allowed = f"-1 (no adapter) or 0..{upper - 1}" if allow_negative else f"0..{upper - 1}"
        raise ValueError(f"{name} has values {values[bad].tolist()} out of range; allowed: {allowed}")


def _validate(q, k, v, lowrank, lora_b, adapter_index, kv_lengths, q_offset, layer, kv_index,
              lowrank_index):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, N, H]; got shape {q.shape}")
    batch, t_len, n_heads, head_dim = q.shape
    lead = 1 if layer is not None else 0
    for name, x in (("k", k), ("v", v)):
        if x.ndim != 4 + lead:
            want = "[L, Rows, S, K, H]" if lead else "[B, S, K, H]"
            raise ValueError(f"{name} must be {want}; got shape {x.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {k.shape}, v {v.shape}")
    rows, s_len, kv_heads, k_head_dim = k.shape[lead:]
    if k_head_dim != head_dim:
        raise ValueError(f"head dim of k/v ({k_head_dim}) differs from q's ({head_dim})")
    if kv_heads < 1 or n_heads % kv_heads:
        raise ValueError(
            f"query heads N={n_heads} must be a multiple of kv heads K={kv_heads} (GQA group N/K)")
    if kv_index is None and rows != batch:
        raise ValueError(f"k/v have {rows} rows but q has batch {batch}; pass kv_index to map rows")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {_dtype_name(x.dtype)}; allowed: float32, bfloat16, "
                             "float16")
    if k.dtype != v.dtype:
        raise ValueError(f"k and v dtypes differ: {_dtype_name(k.dtype)} vs {_dtype_name(v.dtype)}")
    if s_len < 1 or t_len < 1:
        raise ValueError(f"T and S must be >= 1; got T={t_len}, S={s_len}")

    num_agents = rank = 0
    if (lowrank is None) != (lora_b is None):
        raise ValueError("pass both lowrank and lora_b, or neither (plain attention)")
    if lowrank is not None:
        if lowrank.ndim != 3 + lead:
            want = "[L, Rows, S, R]" if lead else "[B, S, R]"
            raise ValueError(f"lowrank must be {want}; got shape {lowrank.shape}")
        lowrank_rows, lowrank_len, rank = lowrank.shape[lead:]
        if lowrank_len != s_len:
            raise ValueError(f"lowrank has {lowrank_len} positions but k/v have S={s_len}")
        if lowrank_index is None and lowrank_rows != batch:
            raise ValueError(f"lowrank has {lowrank_rows} rows but q has batch {batch}; pass "
                             "lowrank_index to map rows")
        if lora_b.ndim != 4:
            raise ValueError(f"lora_b must be [A, K, R, H]; got shape {lora_b.shape}")
        num_agents = lora_b.shape[0]
        if lora_b.shape[1:] != (kv_heads, rank, head_dim):
            raise ValueError(
                f"lora_b must be [A, K={kv_heads}, R={rank}, H={head_dim}]; got {lora_b.shape}")
        if rank < 1:
            raise ValueError(f"rank R must be >= 1; got {rank}")
        if num_agents < 1:
            raise ValueError("lora_b has no agents (A = 0)")
        for name, x in (("lowrank", lowrank), ("lora_b", lora_b)):
            if x.dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"{name} has dtype {_dtype_name(x.dtype)}; allowed: float32, "
                                 "bfloat16, float16")
        if adapter_index is None:
            raise ValueError("adapter_index [B] is required when lowrank is given")
        if adapter_index.shape not in ((batch,), (batch, t_len)):
            raise ValueError(f"adapter_index must be [B={batch}] (or [B, T={t_len}] for the "
                             f"reference); got shape {adapter_index.shape}")
        _check_index_values("adapter_index", adapter_index, num_agents, allow_negative=True)
    for name, x in (("kv_lengths", kv_lengths), ("q_offset", q_offset), ("kv_index", kv_index),
                    ("lowrank_index", lowrank_index)):
        if x is not None and x.shape != (batch,):
            raise ValueError(f"{name} must be [B={batch}]; got shape {x.shape}")
        if x is not None and not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array; got {_dtype_name(x.dtype)}")
    if _is_concrete(kv_lengths):
        values = np.asarray(kv_lengths)
        if ((values < 0) | (values > s_len)).any():
            raise ValueError(f"kv_lengths {values.tolist()} out of range; allowed: 0..S={s_len}")
    _check_index_values("kv_index", kv_index, rows, allow_negative=False)
    if lowrank is not None:
        _check_index_values("lowrank_index", lowrank_index, lowrank.shape[lead], allow_negative=False)
    return dict(batch=batch, t_len=t_len, s_len=s_len, n_heads=n_heads, kv_heads=kv_heads,
                head_dim=head_dim, rank=rank, num_agents=num_agents, dtype=q.dtype,
                has_lowrank=lowrank is not None)


def _load_backend(name: str):
    return importlib.import_module(_BACKEND_MODULES[name])


def default_implementation() -> str:
    """The backend ``implementation=None`` tries first on the default platform."""
    return _PLATFORM_DEFAULT.get(jax.default_backend(), "reference")


def flash_lora_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"] | Float[Array, "L Rows S K H"],
    v: Float[Array, "B S K H"] | Float[Array, "L Rows S K H"],
    lowrank: Float[Array, "B S R"] | Float[Array, "L Rows S R"] | None = None,
    lora_b: Float[Array, "A K R H"] | None = None,
    adapter_index: Int[Array, "B"] | Int[Array, "B T"] | None = None,
    *,
    kv_lengths: Int[Array, "B"] | None = None,
    q_offset: Int[Array, "B"] | None = None,
    causal: bool = True,
    sm_scale: float | None = None,
    implementation: str | None = None,
    block_sizes: Any = None,
    interpret: bool = False,
    layer: Int[Array, ""] | int | None = None,
    kv_index: Int[Array, "B"] | None = None,
    lowrank_index: Int[Array, "B"] | None = None,
) -> Float[Array, "B T N H"]:
    """Attention over a base KV cache plus each row's low-rank value adapter.

    (The one public entry point: its argument documentation is most of its length.)

    Args:
      q: [B, T, N, H] queries.
      k, v: [B, S, K, H] base keys and values (no adapter), or with ``layer`` given a layer-stacked
        cache [L, Rows, S, K, H] of which layer ``layer`` is read.
      lowrank: [B, S, R] (x @ A of the value projection), or [L, Rows, S, R] with ``layer``; None for
        plain attention.
      lora_b: [A, K, R, H] one B per agent (scale alpha/r folded in); None for plain attention.
      adapter_index: [B] int32, the row's agent; -1 means no adapter. The reference also takes
        [B, T]: one agent per query row.
      kv_lengths: [B] int32 valid keys per row (default S).
      q_offset: [B] int32 cache position of query row 0 (default kv_lengths - T).
      causal: key j is visible to query row t iff j <= q_offset + t (and always j < kv_lengths).
      sm_scale: softmax scale (default 1/sqrt(H)).
      implementation: None (chosen by platform and shape, ``select_implementation``, falling back to
        "reference" when that backend cannot take the call), or one of "reference", "triton",
        "mosaic_tpu", "cudnn" (raise if it cannot run).
      block_sizes: backend-specific frozen block sizes; None picks by shape bucket.
      interpret: run a Pallas backend in interpret mode (CPU tests).
      layer: scalar int, the layer to read from layer-stacked k/v/lowrank (avoids slicing a copy).
      kv_index: [B] int32, the k/v row each batch row reads (default: row b reads row b).
      lowrank_index: [B] int32, the lowrank row each batch row reads.

    Returns:
      [B, T, N, H] in q's dtype. Rows that see no key are zeros.

    Forward only: no gradient is defined for the Pallas backends.
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS} or None")
    info = _validate(q, k, v, lowrank, lora_b, adapter_index, kv_lengths, q_offset, layer, kv_index,
                     lowrank_index)
    batch, t_len, s_len = info["batch"], info["t_len"], info["s_len"]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(info["head_dim"])
    if kv_lengths is None:
        kv_lengths = jnp.full((batch,), s_len, jnp.int32)
    kv_lengths = kv_lengths.astype(jnp.int32)
    if q_offset is None:
        q_offset = kv_lengths - t_len
    q_offset = q_offset.astype(jnp.int32)
    if adapter_index is not None:
        adapter_index = adapter_index.astype(jnp.int32)
    if layer is not None:
        layer = jnp.asarray(layer, jnp.int32)
    if kv_index is not None:
        kv_index = kv_index.astype(jnp.int32)
    if lowrank_index is not None:
        lowrank_index = lowrank_index.astype(jnp.int32)

    args = (q, k, v, lowrank, lora_b, adapter_index)
    kwargs = dict(kv_lengths=kv_lengths, q_offset=q_offset, causal=causal, sm_scale=float(sm_scale),
                  layer=layer, kv_index=kv_index, lowrank_index=lowrank_index)

    requested = implementation
    if requested is None:
        requested = select_implementation(
            platform=jax.default_backend(), t_len=t_len, has_lowrank=lowrank is not None,
            per_token_index=adapter_index is not None and adapter_index.ndim == 2)
    if requested == "reference":
        return flash_lora_attention_reference(*args, **kwargs)

    backend = _load_backend(requested)
    reason = backend.unsupported_reason(interpret=interpret, **info)
    if reason is None and adapter_index is not None and adapter_index.ndim == 2:
        reason = "adapter_index of shape [B, T] (one agent per query row) needs the reference"
    if reason is not None:
        if implementation is None:
            return flash_lora_attention_reference(*args, **kwargs)
        raise UnsupportedError(f"implementation={requested!r} cannot run this call: {reason}")
    return backend.flash_lora_attention(*args, **kwargs, block_sizes=block_sizes,
                                        interpret=interpret)
