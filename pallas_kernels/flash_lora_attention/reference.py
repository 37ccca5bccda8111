"""Plain-JAX oracle for Flash-LoRA-Attention.

This file defines the attention contract every backend must match:

    out[b, t, n] = sum_j P[b, n, t, j] * (v[b, j, n // G] + lowrank[b, j] @ lora_b[adapter_index[b], n // G])

with P = softmax_j(q[b, t, n] . k[b, j, n // G] * sm_scale) over the visible keys j, where key j is
visible to query row t iff ``j < kv_lengths[b]`` and, when causal, ``j <= q_offset[b] + t``.
The adapter term is computed in its factored form (P @ C) @ B, never as V + C @ B.
A query row that sees no key gets zeros. ``adapter_index[b] < 0`` means "no adapter" for row b.
The reference alone also takes ``adapter_index`` of shape [B, T]: one agent per query row.

Dimension alphabet: B batch, T query rows, S key positions, N query heads, K kv heads, G = N / K,
H head dim, R rank, A agents (rows of the B table), L layers (optional stacked-cache axis).

The reference is differentiable and is the training path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def select_cache(x, layer, index):
    """Pick this call's view of a (possibly layer-stacked, row-indirected) cache array.

    ``x`` is [Rows, S, ...] or, when ``layer`` is given, [L, Rows, S, ...]; ``index`` [B] names the
    cache row each batch row reads (``None``: row b reads row b).
    """
    if layer is not None:
        x = jax.lax.dynamic_index_in_dim(x, layer, axis=0, keepdims=False)
    if index is not None:
        x = jnp.take(x, index, axis=0)
    return x


def flash_lora_attention_reference(
    q,
    k,
    v,
    lowrank=None,
    lora_b=None,
    adapter_index=None,
    *,
    kv_lengths,
    q_offset,
    causal: bool = True,
    sm_scale: float,
    layer=None,
    kv_index=None,
    lowrank_index=None,
):
    """Reference attention; arguments are already validated and defaulted by ``api``."""
    k = select_cache(k, layer, kv_index)
    v = select_cache(v, layer, kv_index)
    if lowrank is not None:
        lowrank = select_cache(lowrank, layer, lowrank_index)

    batch, t_len, n_heads, head_dim = q.shape
    s_len, kv_heads = k.shape[1], k.shape[2]
    group = n_heads // kv_heads
    f32 = jnp.float32

    qg = q.astype(f32).reshape(batch, t_len, kv_heads, group, head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(f32)) * sm_scale

    key_pos = jnp.arange(s_len, dtype=jnp.int32)
    visible = key_pos[None, None, :] < kv_lengths[:, None, None]  # [B, 1, S]
    if causal:
        query_pos = q_offset[:, None] + jnp.arange(t_len, dtype=jnp.int32)[None, :]  # [B, T]
        visible = visible & (key_pos[None, None, :] <= query_pos[:, :, None])  # [B, T, S]
    else:
        visible = jnp.broadcast_to(visible, (batch, t_len, s_len))
    visible = visible[:, None, None, :, :]  # [B, 1, 1, T, S]

    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(visible, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)

    out = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(f32))
    if lowrank is not None:
        pc = jnp.einsum("bkgts,bsr->btkgr", p, lowrank.astype(f32))
        out = out + adapter_term(pc, lora_b, adapter_index)
    return out.reshape(batch, t_len, n_heads, head_dim).astype(q.dtype)


def adapter_term(pc, lora_b, adapter_index):
    """(P·C)·B of each query's agent, float32: pc [B, T, K, G, R]; lora_b [A, K, R, H];
    ``adapter_index`` [B] or [B, T] (< 0: no adapter, zeros). Returns [B, T, K, G, H]."""
    f32 = jnp.float32
    if adapter_index.ndim == 1:
        safe_index = jnp.clip(adapter_index, 0, lora_b.shape[0] - 1)
        b_rows = jnp.take(lora_b, safe_index, axis=0).astype(f32)  # [B, K, R, H]
        b_rows = b_rows * (adapter_index >= 0).astype(f32)[:, None, None, None]
        return jnp.einsum("btkgr,bkrh->btkgh", pc.astype(f32), b_rows)
    # one agent per query row: a one-hot sum over agents (no gather, cheap gradient)
    onehot = jax.nn.one_hot(adapter_index, lora_b.shape[0], dtype=f32)  # [B, T, A]
    return jnp.einsum("btkgr,akrh,bta->btkgh", pc.astype(f32), lora_b.astype(f32), onehot)
