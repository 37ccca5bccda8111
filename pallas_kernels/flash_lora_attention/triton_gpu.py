"""Flash-LoRA-Attention on GPU through the Pallas Triton backend.

Two kernels share one online-softmax body with two accumulators, P @ V_base [rows, H] and
P @ C [rows, R], rescaled by the running max together and normalised by the running sum together;
(P @ C) @ B_agent is added once per tile at the end. V + C @ B is never built.

* prefill (many query rows): grid (query blocks, B, N), one query head per program. The key loop
  runs in two parts: blocks every row of the tile sees in full (no masking work), then the blocks on
  the causal diagonal or past kv_lengths (masked). Blocks no row can see are never visited. Heavy
  (late) query blocks are launched first so the causal tail does not run alone.
* decode (T <= 16): grid (K, splits, B). The G query heads of one KV group times the T query rows are
  packed into one tile, so every K/V/C block is read once per group; the key range is split
  (split-K) and each split writes an unnormalised output (adapter term included, it is linear in P)
  with its running max and sum. A second small kernel, one program per packed row, merges the
  splits by log-sum-exp and writes [B, T, N, H].

Dimension alphabet as in ``reference.py``; M = G * T packed decode rows, Mp that padded to a power
of two >= 16 (Triton's dot needs >= 16 along each side), Rp = R padded the same way.

Caches are read in place: a layer-stacked [L, Rows, S, ...] cache is viewed as [L * Rows, S, ...]
(a free reshape) and each batch row reads row ``layer * Rows + index[b]``, so a model running its
layers under ``lax.scan`` never copies a layer's cache before the call.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_lora_attention.api import kernel_limits_problem

_LOG2E = math.log2(math.e)
_MIN_DOT = 16  # Triton's tt.dot needs every side >= 16
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")
# Programs the decode grid aims for: a few per streaming multiprocessor (132 on an H100/H200).
_DECODE_TARGET_PROGRAMS = 512
# The merge kernel holds every split of one row in registers at once.
_MAX_SPLITS = 64


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Triton kernels.

    Attributes:
      block_q: prefill query rows per program.
      block_k: prefill keys per loop step.
      num_warps, num_stages: prefill launch and software-pipelining depth.
      decode_block_k: decode keys per loop step.
      decode_num_warps, decode_num_stages: decode partial kernel's launch and pipelining depth.
      decode_splits: key-range splits of the decode kernel; None picks enough programs to fill the
        GPU (about ``_DECODE_TARGET_PROGRAMS``).
      decode_max_t: calls with T <= this (and G * T <= 128) take the decode kernel.
      rank_pad, decode_rank_pad: R is padded (inside the kernel, by masked loads) to a power of two
        at least this. Decode pads to 64: with R padded to 16, the P @ C product takes another
        register layout than P @ V and P is converted between them every step (measured +15% at
        R=16 against +1% at R=64, see NOTES.md); the padding costs no bytes, only idle MMA lanes.
    """

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    decode_block_k: int = 64
    decode_num_warps: int = 4
    decode_num_stages: int = 3
    decode_splits: int | None = None
    decode_max_t: int = 16
    rank_pad: int = 16
    decode_rank_pad: int = 64

    def __post_init__(self):
        for name in ("block_q", "block_k", "decode_block_k", "rank_pad", "decode_rank_pad"):
            value = getattr(self, name)
            if not _is_pow2(value) or value < _MIN_DOT:
                raise ValueError(f"BlockSizes.{name}={value} must be a power of two >= {_MIN_DOT}")
        for name in ("num_warps", "decode_num_warps"):
            if getattr(self, name) not in (1, 2, 4, 8, 16):
                raise ValueError(f"BlockSizes.{name} must be 1, 2, 4, 8 or 16")
        if self.num_stages < 1 or self.decode_num_stages < 1:
            raise ValueError("num_stages must be >= 1")
        if self.decode_splits is not None and not 1 <= self.decode_splits <= _MAX_SPLITS:
            raise ValueError(f"BlockSizes.decode_splits={self.decode_splits} must be in "
                             f"1..{_MAX_SPLITS} or None")
        if self.decode_max_t < 0:
            raise ValueError("BlockSizes.decode_max_t must be >= 0")


def default_block_sizes(*, t_len: int, head_dim: int, rank: int, dtype) -> BlockSizes:
    """Block sizes by shape bucket (H=128 bf16 measured on an H100; see NOTES.md)."""
    wide = jnp.dtype(dtype).itemsize >= 4  # f32 tiles take twice the shared memory
    rank_pad = 16
    if head_dim >= 256:
        prefill = dict(block_q=64, block_k=32, num_warps=8, num_stages=2)
        if wide:
            prefill.update(block_q=32, block_k=16)
    elif wide:
        prefill = dict(block_q=64, block_k=32, num_warps=4, num_stages=2)
    elif head_dim <= 64:
        prefill = dict(block_q=128, block_k=64, num_warps=4, num_stages=3)
    elif 0 < rank <= 64:
        # with the adapter, 128-key steps and C padded to 64 columns ran fastest (16k prefill:
        # 6.3 ms against 7.3 ms for the plain-attention tiles below)
        prefill = dict(block_q=128, block_k=128, num_warps=8, num_stages=2)
        rank_pad = 64
    else:
        # no adapter, or R padded to 128 (7.3 ms at 16k, where 128-key steps would not fit)
        prefill = dict(block_q=128, block_k=64, num_warps=8, num_stages=3)
    if rank > 64 and (head_dim != 128 or wide) and prefill["block_q"] > 64:
        # unmeasured buckets: the [block_q, 128] f32 P @ C accumulator competes for registers
        prefill["block_q"] = 64
    # a short query needs no 128-row tile
    prefill["block_q"] = min(prefill["block_q"], max(_MIN_DOT, _next_pow2(t_len)))
    decode_block_k = 64 if head_dim <= 128 and not wide else 32 if head_dim <= 128 or not wide else 16
    return BlockSizes(**prefill, rank_pad=rank_pad, decode_block_k=decode_block_k)


def unsupported_reason(*, interpret, batch, t_len, s_len, n_heads, kv_heads, head_dim, rank,
                       num_agents, dtype, has_lowrank) -> str | None:
    del batch, t_len, s_len, n_heads, kv_heads, num_agents, has_lowrank
    if not interpret and jax.default_backend() not in _GPU_PLATFORMS:
        return (f"the Triton backend needs a GPU but the default platform is "
                f"{jax.default_backend()!r} (pass interpret=True to run it in interpret mode)")
    return kernel_limits_problem(head_dim, rank, dtype)


# ----------------------------------------------------------------------------------------------
# Shared pieces of the kernels


def _dot(a, b, *, trans_b=False):
    # f32 operands get IEEE products (HIGHEST): Triton's default for an f32 dot is tf32.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((1,), (1,) if trans_b else (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _cache_row(b, index_ref, layer_ref, rows_per_layer):
    row = b if index_ref is None else index_ref[b]
    if layer_ref is not None:
        row = layer_ref[0] * rows_per_layer + row
    return row


def _online_step(carry, q, k, v, c, scale_log2, visible, compute_dtype):
    """One key block of the two-accumulator online softmax; ``visible`` None means all visible."""
    acc, acc_c, m_prev, l_prev = carry
    s = _dot(q, k, trans_b=True) * scale_log2  # [rows, bk], log2 domain
    if visible is not None:
        s = jnp.where(visible, s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # a row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha = jnp.exp2(m_prev - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    l_next = l_prev * alpha + jnp.sum(p, axis=1)
    p_cast = p.astype(compute_dtype)
    acc = acc * alpha[:, None] + _dot(p_cast, v)
    if c is not None:
        acc_c = acc_c * alpha[:, None] + _dot(p_cast, c)
    return acc, acc_c, m_next, l_next


def _load_lora_b(b_ref, adapter_ref, b, kh, rank, rank_pad, compute_dtype):
    agent = adapter_ref[b]
    r_ids = jnp.arange(rank_pad)
    mask = ((r_ids < rank) & (agent >= 0))[:, None]
    tile = plgpu.load(b_ref.at[jnp.maximum(agent, 0), kh, pl.ds(0, rank_pad), :], mask=mask,
                      other=0.0)
    return tile.astype(compute_dtype)


# ----------------------------------------------------------------------------------------------
# Prefill kernel


def _prefill_kernel(kv_len_ref, q_off_ref, adapter_ref, layer_ref, kv_index_ref, lowrank_index_ref,
                    q_ref, k_ref, v_ref, c_ref, b_ref, o_ref, *, causal, scale_log2, t_len,
                    block_q, block_k, group, rows_kv, rows_lowrank, rank, rank_pad, compute_dtype):
    num_q_blocks = pl.num_programs(0)
    qb = num_q_blocks - 1 - pl.program_id(0)  # late (heavy, causal) blocks first
    b = pl.program_id(1)
    n = pl.program_id(2)
    kh = n // group
    head_dim = q_ref.shape[-1]
    has_c = c_ref is not None

    kv_len = kv_len_ref[b]
    q_off = q_off_ref[b]
    kv_row = _cache_row(b, kv_index_ref, layer_ref, rows_kv)
    lowrank_row = _cache_row(b, lowrank_index_ref, layer_ref, rows_lowrank) if has_c else None

    q0 = qb * block_q
    t_ids = q0 + jnp.arange(block_q)
    t_valid = t_ids < t_len
    q = plgpu.load(q_ref.at[b, pl.ds(q0, block_q), n, :], mask=t_valid[:, None], other=0.0)
    q = q.astype(compute_dtype)
    q_pos = q_off + t_ids  # absolute cache position of each query row

    if causal:
        last_t = jnp.minimum(q0 + block_q, t_len) - 1
        hi = jnp.clip(q_off + last_t + 1, 0, kv_len)  # keys any row of the tile sees
        full_hi = jnp.clip(q_off + q0 + 1, 0, kv_len)  # keys every row of the tile sees
    else:
        hi = kv_len
        full_hi = kv_len
    n_full = full_hi // block_k
    n_all = pl.cdiv(hi, block_k)
    r_ids = jnp.arange(rank_pad)
    k_ids = jnp.arange(block_k)

    def body(j, carry, masked):
        j0 = j * block_k
        pos = j0 + k_ids
        in_len = pos < kv_len
        kv_mask = in_len[:, None] if masked else None
        kv_other = 0.0 if masked else None
        k = plgpu.load(k_ref.at[kv_row, pl.ds(j0, block_k), kh, :], mask=kv_mask, other=kv_other)
        v = plgpu.load(v_ref.at[kv_row, pl.ds(j0, block_k), kh, :], mask=kv_mask, other=kv_other)
        c = None
        if has_c:
            c_mask = (r_ids[None, :] < rank) if rank < rank_pad else None
            if masked:
                c_mask = in_len[:, None] if c_mask is None else c_mask & in_len[:, None]
            c = plgpu.load(c_ref.at[lowrank_row, pl.ds(j0, block_k), pl.ds(0, rank_pad)],
                           mask=c_mask,
                           other=None if c_mask is None else 0.0).astype(compute_dtype)
        visible = None
        if masked:
            visible = in_len[None, :]
            if causal:
                visible = visible & (pos[None, :] <= q_pos[:, None])
        return _online_step(carry, q, k.astype(compute_dtype), v.astype(compute_dtype), c,
                            scale_log2, visible, compute_dtype)

    carry = (jnp.zeros((block_q, head_dim), jnp.float32),
             jnp.zeros((block_q, rank_pad), jnp.float32),
             jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(n_full, n_all, functools.partial(body, masked=True), carry)
    acc, acc_c, _, l_sum = carry

    inv_l = 1.0 / jnp.where(l_sum > 0, l_sum, 1.0)  # rows that saw no key: acc is 0, stays 0
    out = acc * inv_l[:, None]
    if has_c:
        lora_b = _load_lora_b(b_ref, adapter_ref, b, kh, rank, rank_pad, compute_dtype)
        out = out + _dot((acc_c * inv_l[:, None]).astype(compute_dtype), lora_b)
    plgpu.store(o_ref.at[b, pl.ds(q0, block_q), n, :], out.astype(o_ref.dtype),
                mask=t_valid[:, None])


# ----------------------------------------------------------------------------------------------
# Decode kernels


def _decode_partial_kernel(kv_len_ref, q_off_ref, adapter_ref, layer_ref, kv_index_ref,
                           lowrank_index_ref, q_ref, k_ref, v_ref, c_ref, b_ref,
                           o_ref, m_ref, l_ref, *, causal, scale_log2, t_len, group, rows_pad,
                           block_k, keys_per_split, rows_kv, rows_lowrank, rank, rank_pad,
                           compute_dtype):
    kh = pl.program_id(0)
    split = pl.program_id(1)
    b = pl.program_id(2)
    head_dim = q_ref.shape[-1]
    has_c = c_ref is not None
    rows = group * t_len

    kv_len = kv_len_ref[b]
    q_off = q_off_ref[b]
    kv_row = _cache_row(b, kv_index_ref, layer_ref, rows_kv)
    lowrank_row = _cache_row(b, lowrank_index_ref, layer_ref, rows_lowrank) if has_c else None

    # packed tile row r is query row t = r // G of head kh * G + r % G
    r_ids = jnp.arange(rows_pad)
    row_valid = r_ids < rows
    t_ids = r_ids // group
    head_ids = kh * group + r_ids % group
    h_ids = jnp.arange(head_dim)
    q = plgpu.load(q_ref.at[b, t_ids[:, None], head_ids[:, None], h_ids[None, :]],
                   mask=row_valid[:, None], other=0.0).astype(compute_dtype)
    q_pos = q_off + t_ids

    hi = jnp.clip(q_off + t_len, 0, kv_len) if causal else kv_len
    start = split * keys_per_split
    stop = jnp.minimum(start + keys_per_split, hi)
    n_blocks = pl.cdiv(jnp.maximum(stop - start, 0), block_k)
    rr_ids = jnp.arange(rank_pad)
    k_ids = jnp.arange(block_k)

    def body(j, carry):
        j0 = start + j * block_k
        pos = j0 + k_ids
        in_len = pos < kv_len
        k = plgpu.load(k_ref.at[kv_row, pl.ds(j0, block_k), kh, :], mask=in_len[:, None],
                       other=0.0)
        v = plgpu.load(v_ref.at[kv_row, pl.ds(j0, block_k), kh, :], mask=in_len[:, None],
                       other=0.0)
        c = None
        if has_c:
            c = plgpu.load(c_ref.at[lowrank_row, pl.ds(j0, block_k), pl.ds(0, rank_pad)],
                           mask=in_len[:, None] & (rr_ids[None, :] < rank),
                           other=0.0).astype(compute_dtype)
        visible = in_len[None, :]
        if causal:
            visible = visible & (pos[None, :] <= q_pos[:, None])
        return _online_step(carry, q, k.astype(compute_dtype), v.astype(compute_dtype), c,
                            scale_log2, visible, compute_dtype)

    carry = (jnp.zeros((rows_pad, head_dim), jnp.float32),
             jnp.zeros((rows_pad, rank_pad), jnp.float32),
             jnp.full((rows_pad,), -jnp.inf, jnp.float32),
             jnp.zeros((rows_pad,), jnp.float32))
    acc, acc_c, m_i, l_i = lax.fori_loop(0, n_blocks, body, carry)
    if has_c:
        # (P @ C) @ B is linear in P, so it can join each split's unnormalised output here and
        # the merge needs no adapter at all.
        lora_b = _load_lora_b(b_ref, adapter_ref, b, kh, rank, rank_pad, compute_dtype)
        acc = acc + _dot(acc_c.astype(compute_dtype), lora_b)
    plgpu.store(o_ref.at[b, kh, split, pl.ds(0, rows_pad), :], acc, mask=row_valid[:, None])
    plgpu.store(m_ref.at[b, kh, split, pl.ds(0, rows_pad)], m_i, mask=row_valid)
    plgpu.store(l_ref.at[b, kh, split, pl.ds(0, rows_pad)], l_i, mask=row_valid)


def _decode_merge_kernel(o_part_ref, m_ref, l_ref, out_ref, *, num_splits, splits_pad, group,
                         rows):
    """Log-sum-exp merge of the splits of one packed row (one query row of one head)."""
    row = pl.program_id(0)
    b = pl.program_id(1)
    kh = row // rows
    r = row % rows
    sp_ids = jnp.arange(splits_pad)
    sp_valid = sp_ids < num_splits
    # one load of every split: a loop over splits would wait a memory latency per split
    m_all = plgpu.load(m_ref.at[b, kh, pl.ds(0, splits_pad), r], mask=sp_valid, other=-jnp.inf)
    l_all = plgpu.load(l_ref.at[b, kh, pl.ds(0, splits_pad), r], mask=sp_valid, other=0.0)
    o_all = plgpu.load(o_part_ref.at[b, kh, pl.ds(0, splits_pad), r, :], mask=sp_valid[:, None],
                       other=0.0)
    m_max = jnp.max(m_all)
    weight = jnp.exp2(m_all - jnp.where(m_max == -jnp.inf, 0.0, m_max))
    l_sum = jnp.sum(weight * l_all)
    out = jnp.sum(weight[:, None] * o_all, axis=0) / jnp.where(l_sum > 0, l_sum, 1.0)
    plgpu.store(out_ref.at[b, r // group, kh * group + r % group, :], out.astype(out_ref.dtype))


# ----------------------------------------------------------------------------------------------
# Wrapper


def _flatten_layers(x, layer):
    """[L, Rows, S, ...] -> [L * Rows, S, ...] (a free reshape); returns (array, rows per layer)."""
    if layer is None:
        return x, x.shape[0]
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), x.shape[1]


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _decode_splits(block_sizes, *, batch, kv_heads, s_len, block_k):
    """(number of splits, keys per split) of the decode grid (K, splits, B).

    Automatic choice, from the H100 sweep in NOTES.md: about 512 programs (the decode tile holds one
    program per SM, so about 4 waves), at least 1024 keys per split, at most 16 splits.
    """
    n_blocks = pl.cdiv(s_len, block_k)
    if block_sizes.decode_splits is not None:
        splits = block_sizes.decode_splits
    else:
        splits = min(16, _pow2_floor(_DECODE_TARGET_PROGRAMS // (batch * kv_heads)),
                     _pow2_floor(s_len // 1024))
    splits = max(1, min(splits, n_blocks, _MAX_SPLITS))
    blocks_per_split = pl.cdiv(n_blocks, splits)
    return pl.cdiv(n_blocks, blocks_per_split), blocks_per_split * block_k


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "block_sizes", "interpret"))
def flash_lora_attention(q, k, v, lowrank, lora_b, adapter_index, *, kv_lengths, q_offset, causal,
                         sm_scale, layer, kv_index, lowrank_index, block_sizes, interpret):
    """Triton Flash-LoRA-Attention; arguments are validated and defaulted by ``api``."""
    batch, t_len, n_heads, head_dim = q.shape
    has_c = lowrank is not None
    k, rows_kv = _flatten_layers(k, layer)
    v, _ = _flatten_layers(v, layer)
    s_len, kv_heads = k.shape[1], k.shape[2]
    group = n_heads // kv_heads
    rank = lowrank.shape[-1] if has_c else 0
    rows_lowrank = 0
    if has_c:
        lowrank, rows_lowrank = _flatten_layers(lowrank, layer)
    else:
        adapter_index = None
    dtypes = [q.dtype, k.dtype, v.dtype] + ([lowrank.dtype, lora_b.dtype] if has_c else [])
    compute_dtype = functools.reduce(jnp.promote_types, dtypes)
    if block_sizes is None:
        block_sizes = default_block_sizes(t_len=t_len, head_dim=head_dim, rank=rank,
                                          dtype=compute_dtype)
    layer_arr = None if layer is None else jnp.reshape(layer, (1,)).astype(jnp.int32)
    scale_log2 = float(sm_scale) * _LOG2E
    meta = (kv_lengths, q_offset, adapter_index, layer_arr, kv_index, lowrank_index)
    common = dict(causal=causal, scale_log2=scale_log2, t_len=t_len, rows_kv=rows_kv,
                  rows_lowrank=rows_lowrank, rank=rank, compute_dtype=compute_dtype)

    rows_pad = max(_MIN_DOT, _next_pow2(group * t_len))
    if t_len <= block_sizes.decode_max_t and group * t_len <= 128:
        block_k = block_sizes.decode_block_k
        num_splits, keys_per_split = _decode_splits(block_sizes, batch=batch, kv_heads=kv_heads,
                                                    s_len=s_len, block_k=block_k)
        rows = group * t_len
        partial = pl.pallas_call(
            functools.partial(_decode_partial_kernel, group=group, rows_pad=rows_pad,
                              block_k=block_k, keys_per_split=keys_per_split,
                              rank_pad=max(block_sizes.decode_rank_pad, _next_pow2(rank)),
                              **common),
            grid=(kv_heads, num_splits, batch),
            out_shape=[
                jax.ShapeDtypeStruct((batch, kv_heads, num_splits, rows, head_dim), jnp.float32),
                jax.ShapeDtypeStruct((batch, kv_heads, num_splits, rows), jnp.float32),
                jax.ShapeDtypeStruct((batch, kv_heads, num_splits, rows), jnp.float32),
            ],
            compiler_params=plgpu.CompilerParams(num_warps=block_sizes.decode_num_warps,
                                                 num_stages=block_sizes.decode_num_stages),
            interpret=interpret,
            name="flash_lora_decode_partial",
        )(*meta, q, k, v, lowrank, lora_b)
        return pl.pallas_call(
            functools.partial(_decode_merge_kernel, num_splits=num_splits,
                              splits_pad=_next_pow2(num_splits), group=group, rows=rows),
            grid=(kv_heads * rows, batch),
            out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
            interpret=interpret,
            name="flash_lora_decode_merge",
        )(*partial)

    block_q = block_sizes.block_q
    return pl.pallas_call(
        functools.partial(_prefill_kernel, block_q=block_q, block_k=block_sizes.block_k,
                          group=group, rank_pad=max(block_sizes.rank_pad, _next_pow2(rank)),
                          **common),
        grid=(pl.cdiv(t_len, block_q), batch, n_heads),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                             num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="flash_lora_prefill",
    )(*meta, q, k, v, lowrank, lora_b)
