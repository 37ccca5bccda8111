"""Flash-LoRA-Attention on TPU through the Pallas Mosaic backend.

Never run on a real TPU in this project: it is verified on CPU in TPU interpret mode
(``pltpu.force_tpu_interpret_mode()`` or ``interpret=True``) and its lowering to Mosaic is checked
on CPU, but Mosaic's own compiler (layouts, VMEM limits) has not seen it. Treat its speed as unknown.

Grid (B, query blocks, key blocks), the key axis innermost and sequential ("arbitrary"). One program
holds the query rows of all N heads for ``block_q`` positions, packed per KV group as rows
t * G + g, and loops over the K KV heads statically, so each K/V/C block is fetched from HBM once.
Two accumulators in VMEM scratch, P @ V_base [rows, H] and P @ C [rows, R], are rescaled by the
running max together and normalised by the running sum together; (P @ C) @ B_agent is added once in
the last key step. V + C @ B is never built.

Scalar prefetch carries kv_lengths, q_offset, adapter_index and the cache row of every batch row, so
the index maps pick the cache row (a layer-stacked [L, Rows, S, ...] cache is viewed as
[L * Rows, S, ...], a free reshape, and read in place) and the agent's B, and clamp the key-block
index past the last visible block: those steps repeat the previous block index, so no DMA is issued,
and the kernel skips their compute.

TPU tiles: a K/V block is [block_k * K, H] of the cache viewed as [Rows, S * K, H] (one DMA per
block, heads interleaved; head kh is a sublane-strided read), C blocks are [block_k, R] (R the full
lane dim), query and output blocks [K, block_q * G, H]. Only q and the output are padded and
transposed in the wrapper (small); the caches are never copied. Tails past S or kv_lengths are
masked, and V / C rows past kv_lengths are zeroed before the products (an edge block holds
undefined memory there).

Known risk on hardware: the sublane-strided head read of a packed dtype (bf16/f16 rows come two to a
sublane) may need the bitcast-to-u32 workaround that jax's ragged_paged_attention uses; interpret
mode and the CPU-side lowering cannot tell.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_lora_attention.api import kernel_limits_problem

_LANES = 128
_SUBLANES = 8


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Mosaic kernel.

    Attributes:
      block_q: query positions per program (all heads of those positions); a multiple of 8, or
        None for T when the whole query fits one tile.
      block_k: key positions per step; a multiple of 8.
    """

    block_q: int | None = None
    block_k: int = 512

    def __post_init__(self):
        if self.block_q is not None and (self.block_q < 1 or self.block_q % _SUBLANES):
            raise ValueError(f"BlockSizes.block_q={self.block_q} must be a positive multiple of 8")
        if self.block_k < 1 or self.block_k % _SUBLANES:
            raise ValueError(f"BlockSizes.block_k={self.block_k} must be a positive multiple of 8")


def default_block_sizes(*, t_len: int, s_len: int, group: int) -> BlockSizes:
    """About 256 packed query rows per tile, 512 keys per step (fewer for short caches)."""
    target_rows = 256
    if t_len * group <= target_rows:
        block_q = None  # one tile holds every query row
    else:
        block_q = max(_SUBLANES, (target_rows // group) // _SUBLANES * _SUBLANES)
    block_k = min(512, _round_up(s_len, _SUBLANES))
    return BlockSizes(block_q=block_q, block_k=block_k)


def unsupported_reason(*, interpret, batch, t_len, s_len, n_heads, kv_heads, head_dim, rank,
                       num_agents, dtype, has_lowrank) -> str | None:
    del batch, t_len, s_len, n_heads, kv_heads, num_agents, has_lowrank
    if not interpret and jax.default_backend() != "tpu":
        return (f"the Mosaic backend needs a TPU but the default platform is "
                f"{jax.default_backend()!r} (pass interpret=True to run it in TPU interpret mode)")
    return kernel_limits_problem(head_dim, rank, dtype)


def _visible_blocks(b, ti, kv_len_ref, q_off_ref, *, causal, t_len, block_q, block_k):
    """Number of key blocks any query row of tile ``ti`` of batch row ``b`` can see."""
    kv_len = kv_len_ref[b]
    if causal:
        last_t = jnp.minimum((ti + 1) * block_q, t_len) - 1
        hi = jnp.clip(q_off_ref[b] + last_t + 1, 0, kv_len)
    else:
        hi = kv_len
    return (hi + block_k - 1) // block_k


def _dot(a, b, contract_b: int):
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _kernel(kv_len_ref, q_off_ref, adapter_ref, kv_row_ref, lowrank_row_ref,  # scalar prefetch
            q_ref, q_pos_ref, k_ref, v_ref, *rest, causal, sm_scale, t_len, kv_heads, block_q,
            block_k, has_c, compute_dtype):
    del kv_row_ref, lowrank_row_ref  # used by the index maps only
    if has_c:
        c_ref, b_ref, o_ref, m_scr, l_scr, acc_scr, acc_c_scr = rest
    else:
        o_ref, m_scr, l_scr, acc_scr = rest
        c_ref = b_ref = acc_c_scr = None
    b = pl.program_id(0)
    ti = pl.program_id(1)
    si = pl.program_id(2)
    rows = q_ref.shape[1]

    @pl.when(si == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
        if has_c:
            acc_c_scr[...] = jnp.zeros(acc_c_scr.shape, jnp.float32)

    n_blocks = _visible_blocks(b, ti, kv_len_ref, q_off_ref, causal=causal, t_len=t_len,
                               block_q=block_q, block_k=block_k)

    @pl.when(si < n_blocks)
    def _step():
        kv_len = kv_len_ref[b]
        pos_col = si * block_k + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        visible = pos_col < kv_len
        if causal:
            visible = visible & (pos_col <= q_pos_ref[...])  # q_pos block is [rows, 1]
        pos_row = si * block_k + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
        key_valid = pos_row < kv_len
        c = None
        if has_c:
            c = jnp.where(key_valid, c_ref[...].astype(compute_dtype), 0)
        for kh in range(kv_heads):
            q = q_ref[kh].astype(compute_dtype)
            k = k_ref[pl.ds(kh, block_k, stride=kv_heads), :].astype(compute_dtype)
            v = v_ref[pl.ds(kh, block_k, stride=kv_heads), :].astype(compute_dtype)
            v = jnp.where(key_valid, v, 0)
            s = _dot(q, k, 1) * sm_scale
            s = jnp.where(visible, s, -jnp.inf)
            m_prev = m_scr[kh]  # [rows, 128], lanes replicated
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
            alpha = jnp.exp(m_prev - m_safe)
            p = jnp.exp(s - m_safe[:, :1])
            l_scr[kh] = alpha * l_scr[kh] + jnp.sum(p, axis=1, keepdims=True)
            m_scr[kh] = m_next
            p_cast = p.astype(compute_dtype)
            acc_scr[kh] = acc_scr[kh] * alpha[:, :1] + _dot(p_cast, v, 0)
            if has_c:
                acc_c_scr[kh] = acc_c_scr[kh] * alpha[:, :1] + _dot(p_cast, c, 0)

    @pl.when(si == pl.num_programs(2) - 1)
    def _finish():
        adapter_on = adapter_ref[b] >= 0
        for kh in range(kv_heads):
            l_sum = l_scr[kh][:, :1]
            inv_l = 1.0 / jnp.where(l_sum > 0, l_sum, 1.0)
            out = acc_scr[kh] * inv_l
            if has_c:
                lora_b = jnp.where(adapter_on, b_ref[kh].astype(compute_dtype), 0)
                out = out + _dot((acc_c_scr[kh] * inv_l).astype(compute_dtype), lora_b, 0)
            o_ref[kh] = out.astype(o_ref.dtype)


def _cache_rows(batch, layer, rows_per_layer, index):
    rows = jnp.arange(batch, dtype=jnp.int32) if index is None else index
    if layer is not None:
        rows = rows + layer * rows_per_layer
    return rows.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "block_sizes", "interpret"))
def flash_lora_attention(q, k, v, lowrank, lora_b, adapter_index, *, kv_lengths, q_offset, causal,
                         sm_scale, layer, kv_index, lowrank_index, block_sizes, interpret):
    """Mosaic Flash-LoRA-Attention; arguments are validated and defaulted by ``api``."""
    batch, t_len, n_heads, head_dim = q.shape
    has_c = lowrank is not None
    k, v, lowrank, rows_kv, rows_lowrank = _flatten_layers(k, v, lowrank, layer)
    s_len, kv_heads = k.shape[1], k.shape[2]
    group = n_heads // kv_heads
    dtypes = [q.dtype, k.dtype, v.dtype] + ([lowrank.dtype, lora_b.dtype] if has_c else [])
    compute_dtype = functools.reduce(jnp.promote_types, dtypes)
    if block_sizes is None:
        block_sizes = default_block_sizes(t_len=t_len, s_len=s_len, group=group)
    block_q = t_len if block_sizes.block_q is None else block_sizes.block_q
    block_k = block_sizes.block_k
    t_pad = _round_up(t_len, block_q)
    rows = block_q * group

    q_packed, q_pos = _pack_queries(q, q_offset, t_pad, kv_heads)
    kv_rows = _cache_rows(batch, layer, rows_kv, kv_index)
    lowrank_rows = _cache_rows(batch, layer, rows_lowrank, lowrank_index) if has_c else kv_rows
    adapter = adapter_index if has_c else jnp.full((batch,), -1, jnp.int32)
    k_flat = k.reshape(k.shape[0], s_len * kv_heads, head_dim)  # free: heads stay interleaved
    v_flat = v.reshape(v.shape[0], s_len * kv_heads, head_dim)
    visible = functools.partial(_visible_blocks, causal=causal, t_len=t_len, block_q=block_q,
                                block_k=block_k)
    maps = _IndexMaps(visible)
    in_specs = [
        pl.BlockSpec((None, kv_heads, rows, head_dim), maps.q),
        pl.BlockSpec((None, rows, 1), maps.q_pos),
        pl.BlockSpec((None, block_k * kv_heads, head_dim), maps.kv),
        pl.BlockSpec((None, block_k * kv_heads, head_dim), maps.kv),
    ]
    operands = [q_packed, q_pos, k_flat, v_flat]
    scratch = [
        pltpu.VMEM((kv_heads, rows, _LANES), jnp.float32),  # running max, lanes replicated
        pltpu.VMEM((kv_heads, rows, _LANES), jnp.float32),  # running sum
        pltpu.VMEM((kv_heads, rows, head_dim), jnp.float32),  # P @ V_base
    ]
    if has_c:
        rank = lowrank.shape[-1]
        in_specs += [
            pl.BlockSpec((None, block_k, rank), maps.c),
            pl.BlockSpec((None, kv_heads, rank, head_dim), maps.lora_b),
        ]
        operands += [lowrank, lora_b]
        scratch.append(pltpu.VMEM((kv_heads, rows, rank), jnp.float32))  # P @ C

    kernel = functools.partial(_kernel, causal=causal, sm_scale=float(sm_scale), t_len=t_len,
                               kv_heads=kv_heads, block_q=block_q, block_k=block_k, has_c=has_c,
                               compute_dtype=compute_dtype)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(batch, t_pad // block_q, pl.cdiv(s_len, block_k)),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, kv_heads, rows, head_dim), maps.q),
            scratch_shapes=scratch,
        ),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, t_pad * group, head_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="flash_lora_attention_mosaic",
    )(kv_lengths, q_offset, adapter, kv_rows, lowrank_rows, *operands)
    out = out.reshape(batch, kv_heads, t_pad, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out[:, :t_len].reshape(batch, t_len, n_heads, head_dim)


def _flatten_layers(k, v, lowrank, layer):
    """A layer-stacked [L, Rows, S, ...] cache viewed as [L * Rows, S, ...] (a free reshape);
    returns (k, v, lowrank, rows per layer of k/v, of lowrank)."""
    if layer is None:
        return k, v, lowrank, k.shape[0], (lowrank.shape[0] if lowrank is not None else 0)
    rows_kv = k.shape[1]
    k = k.reshape((-1,) + k.shape[2:])
    v = v.reshape((-1,) + v.shape[2:])
    rows_lowrank = 0
    if lowrank is not None:
        rows_lowrank = lowrank.shape[1]
        lowrank = lowrank.reshape((-1,) + lowrank.shape[2:])
    return k, v, lowrank, rows_kv, rows_lowrank


def _pack_queries(q, q_offset, t_pad: int, kv_heads: int):
    """q [B, T, N, H] -> [B, K, T_pad * G, H], packed rows t * G + g of each KV group, and the
    absolute position of every packed row as a [B, T_pad * G, 1] column for the causal mask."""
    batch, t_len, n_heads, head_dim = q.shape
    group = n_heads // kv_heads
    q_packed = jnp.pad(q, ((0, 0), (0, t_pad - t_len), (0, 0), (0, 0)))
    q_packed = q_packed.reshape(batch, t_pad, kv_heads, group, head_dim)
    q_packed = q_packed.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, t_pad * group, head_dim)
    q_pos = q_offset[:, None] + jnp.arange(t_pad, dtype=jnp.int32)[None, :]
    q_pos = jnp.repeat(q_pos, group, axis=1)[:, :, None]
    return q_packed, q_pos


class _IndexMaps:
    """Block index maps of the grid (b, ti, si) with the scalar-prefetch refs (kv_lengths,
    q_offset, adapter_index, kv row, lowrank row): the cache rows and the agent's B by row; past
    the last visible key block the block index repeats, so no new DMA is issued."""

    def __init__(self, visible):
        self.visible = visible

    def _key_block(self, b, ti, si, kv_len_ref, q_off_ref):
        return jnp.minimum(si, jnp.maximum(self.visible(b, ti, kv_len_ref, q_off_ref) - 1, 0))

    def q(self, b, ti, si, *refs):
        return (b, 0, ti, 0)

    def q_pos(self, b, ti, si, *refs):
        return (b, ti, 0)

    def kv(self, b, ti, si, kv_len_ref, q_off_ref, adapter_ref, kv_row_ref, lowrank_row_ref):
        return (kv_row_ref[b], self._key_block(b, ti, si, kv_len_ref, q_off_ref), 0)

    def c(self, b, ti, si, kv_len_ref, q_off_ref, adapter_ref, kv_row_ref, lowrank_row_ref):
        return (lowrank_row_ref[b], self._key_block(b, ti, si, kv_len_ref, q_off_ref), 0)

    def lora_b(self, b, ti, si, kv_len_ref, q_off_ref, adapter_ref, kv_row_ref, lowrank_row_ref):
        return (jnp.maximum(adapter_ref[b], 0), 0, 0, 0)
