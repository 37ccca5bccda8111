"""Flash-LoRA-Attention through cuDNN's fused attention, with the adapter term materialised.

For long prefill chunks on a GPU, cuDNN's fused attention (warp-specialised, near the matmul rate)
beats the Pallas Triton prefill kernel by more than the price of materialising each row's adapter
values once: V' = V + C·B_agent [B, S, K, H] (only the row's own agent), then attention over V'.
This is not the two-accumulator algorithm; it is the fastest exact path where the chunk is long
(thresholds in ``api.DispatchThresholds``, measured in NOTES.md).

cuDNN's causal mask is aligned top-left (query row t sees keys 0..t), while a chunk at cache
position ``q_offset`` must see keys 0..q_offset+t. So the attention runs in two parts merged by
their log-sum-exp: (1) every query row against the keys before the chunk (all visible: a padding
mask at q_offset), (2) the chunk against its own keys (top-left causal). A row with no key in a
part gets weight zero there.

``interpret=True`` runs the same two parts through a plain-XLA attention with the same masks (CPU
tests of everything but the cuDNN call itself).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_lora_attention.reference import select_cache

_GPU_PLATFORMS = ("gpu", "cuda")
_HALF = (jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256  # cuDNN's widest head on Hopper


def unsupported_reason(*, interpret: bool = False, head_dim: int, dtype, **_) -> str | None:
    if not interpret and jax.default_backend() not in _GPU_PLATFORMS:
        return f"cuDNN attention needs an NVIDIA GPU (platform is {jax.default_backend()!r})"
    if not interpret and jnp.dtype(dtype) not in [jnp.dtype(d) for d in _HALF]:
        return f"cuDNN attention needs bfloat16 or float16 (got {jnp.dtype(dtype).name})"
    if head_dim > MAX_HEAD_DIM or head_dim % 8:
        return f"cuDNN attention needs head_dim <= {MAX_HEAD_DIM} and a multiple of 8 (got {head_dim})"
    return None


def materialise_values(v, lowrank, lora_b, adapter_index):
    """V + C·B of each row's own agent: v [B, S, K, H], lowrank [B, S, R], lora_b [A, K, R, H],
    adapter_index [B] (< 0: no adapter). Float32 accumulation, v's dtype out."""
    safe = jnp.clip(adapter_index, 0, lora_b.shape[0] - 1)
    b_rows = jnp.take(lora_b, safe, axis=0).astype(jnp.float32)
    b_rows = b_rows * (adapter_index >= 0).astype(jnp.float32)[:, None, None, None]
    delta = jnp.einsum("bsr,bkrh->bskh", lowrank.astype(jnp.float32), b_rows)
    return (v.astype(jnp.float32) + delta).astype(v.dtype)


def _xla_attention(q, k, v, kv_len, *, causal: bool, sm_scale: float):
    """(out [B, T, N, H] float32, lse [B, T, N]) with cuDNN's mask semantics: key j visible iff
    j < kv_len (and j <= t when causal). Rows that see nothing: out 0, lse -inf."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    qg = q.astype(jnp.float32).reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bskh->btkgs", qg, k.astype(jnp.float32)) * sm_scale
    key = jnp.arange(S)
    visible = key[None, None, :] < kv_len[:, None, None]  # [B, 1, S]
    if causal:
        visible = visible & (key[None, None, :] <= jnp.arange(T)[None, :, None])
    visible = jnp.broadcast_to(visible, (B, T, S))[:, :, None, None, :]
    scores = jnp.where(visible, scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [B, T, K, G]
    p = jnp.where(visible, jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]),
                  0.0)
    out = jnp.einsum("btkgs,bskh->btkgh", p, v.astype(jnp.float32))
    return out.reshape(B, T, N, H), lse.reshape(B, T, N)


def _cudnn_attention(q, k, v, kv_len, *, causal: bool, sm_scale: float):
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    B, T = q.shape[:2]
    q_len = jnp.full((B,), T, jnp.int32)
    # cuDNN reads no key at kv_len 0; such rows are zeroed by the caller
    kv_len = jnp.maximum(kv_len, 1).astype(jnp.int32)
    mask = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
    out, lse = cudnn.dot_product_attention(q, k, v, q_seqlen=q_len, kv_seqlen=kv_len,
                                           scale=sm_scale, mask_type=mask, qkv_layout="BTNH",
                                           return_residual=True)
    return out.astype(jnp.float32), jnp.transpose(lse, (0, 2, 1))  # lse [B, N, T] -> [B, T, N]


def flash_lora_attention(q, k, v, lowrank=None, lora_b=None, adapter_index=None, *, kv_lengths,
                         q_offset, causal: bool = True, sm_scale: float, layer=None,
                         kv_index=None, lowrank_index=None, block_sizes=None,
                         interpret: bool = False):
    """Same contract as the reference (arguments validated and defaulted by ``api``)."""
    del block_sizes
    attend = _xla_attention if interpret else _cudnn_attention
    k = select_cache(k, layer, kv_index)
    v = select_cache(v, layer, kv_index)
    if lowrank is not None:
        lowrank = select_cache(lowrank, layer, lowrank_index)
        v = materialise_values(v, lowrank, lora_b, adapter_index)
    B, T = q.shape[:2]
    S = k.shape[1]
    if not causal:
        out, lse = attend(q, k, v, kv_lengths, causal=False, sm_scale=sm_scale)
        seen = (kv_lengths > 0)[:, None, None, None]
        return jnp.where(seen, out, 0.0).astype(q.dtype)

    # (1) keys before the chunk: visible to every query row
    before = jnp.clip(jnp.minimum(q_offset, kv_lengths), 0, S)
    out1, lse1 = attend(q, k, v, before, causal=False, sm_scale=sm_scale)
    # (2) the chunk's own keys from position max(q_offset, 0), top-left causal. A negative
    # offset d = -q_offset shifts the queries by d rows (query t sees chunk keys <= t - d);
    # positions past S only ever meet padding queries.
    first = jnp.maximum(q_offset, 0)
    shift = first - q_offset  # [B], >= 0
    rows = jnp.arange(T)[None, :]
    positions = jnp.clip(first[:, None] + rows, 0, S - 1)  # [B, T]
    k_chunk = jnp.take_along_axis(k, positions[:, :, None, None], axis=1)
    v_chunk = jnp.take_along_axis(v, positions[:, :, None, None], axis=1)
    q_rows = jnp.clip(rows + shift[:, None], 0, T - 1)
    q_shifted = jnp.take_along_axis(q, q_rows[:, :, None, None], axis=1)
    own = jnp.clip(kv_lengths - first, 0, T)
    out2, lse2 = attend(q_shifted, k_chunk, v_chunk, own, causal=True, sm_scale=sm_scale)
    back = jnp.clip(rows - shift[:, None], 0, T - 1)  # query t <- shifted row t - d
    out2 = jnp.take_along_axis(out2, back[:, :, None, None], axis=1)
    lse2 = jnp.take_along_axis(lse2, back[:, :, None], axis=1)
    lse2 = jnp.where((rows >= shift[:, None])[:, :, None], lse2, -jnp.inf)

    neg = jnp.float32(-jnp.inf)
    lse1 = jnp.where((before > 0)[:, None, None], lse1, neg)
    lse2 = jnp.where((own > 0)[:, None, None], lse2, neg)
    top = jnp.maximum(lse1, lse2)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w1, w2 = jnp.exp(lse1 - top), jnp.exp(lse2 - top)  # exp(-inf) = 0 for an empty part
    total = w1 + w2
    norm = jnp.where(total > 0, total, 1.0)
    out = (jnp.where(w1[..., None] > 0, out1, 0.0) * w1[..., None]
           + jnp.where(w2[..., None] > 0, out2, 0.0) * w2[..., None]) / norm[..., None]
    return out.astype(q.dtype)
