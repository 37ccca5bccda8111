"""Flash-LoRA-Attention backends against the reference.

One parameterized class runs every case against each Pallas backend: the Triton backend compiled for
real where a GPU is the default platform and in interpret mode elsewhere; the Mosaic backend compiled
on a TPU and in TPU interpret mode on CPU (skipped on a GPU host, where interpret mode would only
test the same thing slowly). Inputs are fresh random numbers per case, seeded from the case name.
The case list samples the grid (T, S, N/K, R, H, dtype, offsets, ragged lengths, options) so that
every value of every axis appears at least once without running the full product.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.flash_lora_attention import UnsupportedError, flash_lora_attention
from pallas_kernels.flash_lora_attention import mosaic_tpu, triton_gpu

PLATFORM = jax.default_backend()
ON_GPU = PLATFORM in ("gpu", "cuda", "rocm")
ON_TPU = PLATFORM == "tpu"
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}
BACKENDS = ("triton", "mosaic_tpu")  # the Pallas kernels
GRID_BACKENDS = BACKENDS + ("cudnn",)  # every backend the odd-shape grid checks


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    t_len: int
    s_len: int
    n_heads: int
    kv_heads: int
    head_dim: int
    rank: int  # 0: plain attention (lowrank=None)
    dtype: type = jnp.float32
    causal: bool = True
    offsets: str = "default"  # "default" (kv_len - T), "early" (< kv_len - T), "zero"
    lengths: str = "ragged"  # "full", "ragged", "with_empty" (one row has kv_length 0)
    layered: bool = False  # layer-stacked caches read through layer / kv_index / lowrank_index
    num_agents: int = 3
    triton_blocks: triton_gpu.BlockSizes | None = None
    mosaic_blocks: mosaic_tpu.BlockSizes | None = None

    @property
    def name(self) -> str:
        parts = [f"B{self.batch}", f"T{self.t_len}", f"S{self.s_len}",
                 f"N{self.n_heads}K{self.kv_heads}", f"H{self.head_dim}",
                 f"R{self.rank}" if self.rank else "noLoRA", jnp.dtype(self.dtype).name]
        if not self.causal:
            parts.append("noncausal")
        if self.offsets != "default":
            parts.append(f"offset-{self.offsets}")
        if self.lengths != "ragged":
            parts.append(self.lengths)
        if self.layered:
            parts.append("layered")
        if self.triton_blocks is not None or self.mosaic_blocks is not None:
            parts.append("smallblocks")
        return "_".join(parts)


_F32, _BF16, _F16 = jnp.float32, jnp.bfloat16, jnp.float16
CASES = [
    # decode path (T <= 16): split-K, KV-group packing
    Case(1, 1, 1, 1, 1, 64, 1, lengths="full"),
    Case(2, 1, 100, 4, 1, 64, 8),
    Case(3, 1, 2000, 8, 1, 128, 24, _BF16, triton_blocks=triton_gpu.BlockSizes(decode_splits=4)),
    Case(2, 3, 513, 12, 4, 128, 8, _F16, offsets="early"),
    Case(2, 3, 100, 8, 8, 64, 64, causal=False),
    Case(3, 3, 100, 4, 1, 64, 8, lengths="with_empty"),
    Case(2, 1, 513, 8, 2, 256, 8),
    Case(1, 16, 513, 8, 1, 64, 8, _BF16, offsets="early"),
    Case(2, 1, 513, 8, 2, 128, 0, _BF16),
    Case(2, 4, 513, 8, 2, 64, 8, layered=True),
    Case(2, 1, 2000, 4, 1, 64, 8,
         triton_blocks=triton_gpu.BlockSizes(decode_block_k=16, decode_splits=37),
         mosaic_blocks=mosaic_tpu.BlockSizes(block_k=64)),
    # prefill path
    Case(2, 77, 100, 3, 1, 64, 24),
    Case(1, 77, 2000, 4, 1, 128, 64, _BF16, offsets="early"),
    Case(2, 256, 513, 8, 2, 64, 8, _F16),
    Case(2, 256, 100, 4, 4, 128, 1, offsets="zero"),
    Case(1, 256, 2000, 8, 1, 64, 8, _BF16, lengths="full"),
    Case(2, 77, 513, 6, 2, 256, 24, _BF16),
    Case(2, 77, 1, 4, 1, 64, 8, offsets="zero", lengths="full"),
    Case(2, 77, 100, 4, 2, 64, 0),
    Case(2, 77, 513, 8, 2, 64, 8, _BF16, causal=False),
    Case(2, 17, 100, 4, 1, 128, 8, lengths="with_empty"),
    Case(2, 77, 513, 4, 1, 128, 24, _BF16, layered=True),
    Case(1, 256, 513, 2, 1, 64, 8, offsets="early",
         triton_blocks=triton_gpu.BlockSizes(block_q=32, block_k=16),
         mosaic_blocks=mosaic_tpu.BlockSizes(block_q=32, block_k=64)),
]


def make_inputs(case: Case):
    """Random inputs (never zeros) and keyword arguments for one case, seeded from its name.

    Drawn with NumPy: drawing with jax.random would compile a program per shape and cost seconds.
    """
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    b, t, s, n, kh, h, r = (case.batch, case.t_len, case.s_len, case.n_heads, case.kv_heads,
                            case.head_dim, case.rank)

    def normal(shape, scale=1.0):
        x = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        return jnp.asarray(x.astype(jnp.dtype(case.dtype)))

    def int32(x):
        return jnp.asarray(np.asarray(x, np.int32))

    kwargs = {}
    if case.layered:
        layers, kv_rows, lr_rows = 3, b + 1, b + 2
        k = normal((layers, kv_rows, s, kh, h))
        v = normal((layers, kv_rows, s, kh, h))
        lowrank = normal((layers, lr_rows, s, r)) if r else None
        kwargs["layer"] = jnp.int32(1)
        kwargs["kv_index"] = int32(rng.permutation(kv_rows)[:b])
        if r:
            kwargs["lowrank_index"] = int32(rng.permutation(lr_rows)[:b])
    else:
        k = normal((b, s, kh, h))
        v = normal((b, s, kh, h))
        lowrank = normal((b, s, r)) if r else None
    q = normal((b, t, n, h))
    lora_b = normal((case.num_agents, kh, r, h), 0.5) if r else None
    # every row a different agent where the batch allows, row 0 without adapter
    adapter_index = int32(np.arange(b) % (case.num_agents + 1) - 1) if r else None

    if case.lengths == "full":
        kv_lengths = np.full((b,), s)
    else:
        kv_lengths = rng.integers(max(1, s // 3), s + 1, size=b)
        kv_lengths[-1] = s
        if case.lengths == "with_empty":
            kv_lengths[0] = 0
    kwargs["kv_lengths"] = int32(kv_lengths)
    if case.offsets == "zero":
        kwargs["q_offset"] = int32(np.zeros(b))
    elif case.offsets == "early":
        kwargs["q_offset"] = int32(rng.integers(0, np.maximum(kv_lengths - t, 0) + 1))
    kwargs["causal"] = case.causal
    return (q, k, v, lowrank, lora_b, adapter_index), kwargs


_reference_jit = jax.jit(functools.partial(flash_lora_attention, implementation="reference"),
                         static_argnames=("causal",))


def _reference(*args, **kwargs):
    # XLA's default f32 matmul on a GPU is tf32 (about 1e-3 relative): the oracle needs full f32
    with jax.default_matmul_precision("highest"):
        return _reference_jit(*args, **kwargs)


def relative_error(out, ref) -> float:
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "kernel output has NaN or inf"
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


def run_backend(backend: str, args, kwargs, block_sizes=None):
    if backend == "cudnn":
        if ON_TPU:
            pytest.skip("cuDNN backend on a TPU host")
        if ON_GPU and args[0].dtype == jnp.float32:
            pytest.skip("cuDNN attention takes half precision only")
        return flash_lora_attention(*args, **kwargs, implementation="cudnn", interpret=not ON_GPU)
    if backend == "triton":
        if ON_TPU:
            pytest.skip("Triton backend on a TPU host")
        return flash_lora_attention(*args, **kwargs, implementation="triton",
                                    block_sizes=block_sizes, interpret=not ON_GPU)
    if ON_GPU:
        pytest.skip("Mosaic TPU interpret mode is tested on CPU hosts")
    return flash_lora_attention(*args, **kwargs, implementation="mosaic_tpu",
                                block_sizes=block_sizes, interpret=not ON_TPU)


def check_case(backend: str, case: Case):
    args, kwargs = make_inputs(case)
    ref = _reference(*args, **kwargs)
    blocks = case.triton_blocks if backend == "triton" else case.mosaic_blocks
    out = run_backend(backend, args, kwargs, blocks)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = relative_error(out, ref)
    assert err <= TOLERANCE[case.dtype], f"{case.name}: relative error {err:.2e}"
    if case.lengths == "with_empty":
        assert not np.asarray(out[0], np.float32).any(), "a row that sees no key must be zeros"


@pytest.mark.parametrize("backend", GRID_BACKENDS)
class TestFlashLoraAttention:
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_reference(self, backend, case):
        check_case(backend, case)

    @settings(max_examples=4, deadline=None, derandomize=True)
    @given(data=st.data())
    def test_matches_reference_property(self, backend, data):
        kv_heads = data.draw(st.sampled_from([1, 2]), "kv_heads")
        case = Case(
            batch=data.draw(st.integers(1, 3), "batch"),
            t_len=data.draw(st.sampled_from([1, 2, 5, 16, 17, 40]), "t_len"),
            s_len=data.draw(st.integers(1, 300), "s_len"),
            n_heads=kv_heads * data.draw(st.integers(1, 4), "group"),
            kv_heads=kv_heads,
            head_dim=data.draw(st.sampled_from([64, 128]), "head_dim"),
            rank=data.draw(st.sampled_from([0, 1, 3, 16, 33]), "rank"),
            dtype=data.draw(st.sampled_from([_F32, _BF16]), "dtype"),
            causal=data.draw(st.booleans(), "causal"),
            offsets=data.draw(st.sampled_from(["default", "early", "zero"]), "offsets"),
            lengths=data.draw(st.sampled_from(["full", "ragged", "with_empty"]), "lengths"),
            layered=data.draw(st.booleans(), "layered"),
        )
        check_case(backend, case)


# ------------------------------------------------------------------------------------------------
# Errors and dispatch through api.py


def _small_inputs(h=64, r=8, a=2, dtype=jnp.float32):
    rng = np.random.default_rng(7)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32).astype(jnp.dtype(dtype)))

    q = normal(2, 3, 4, h)
    k, v = normal(2, 10, 2, h), normal(2, 10, 2, h)
    return q, k, v, normal(2, 10, r), normal(a, 2, r, h), jnp.array([-1, 1], jnp.int32)


def test_bad_shapes_raise():
    q, k, v, lowrank, lora_b, idx = _small_inputs()
    with pytest.raises(ValueError, match="q must be"):
        flash_lora_attention(q[0], k, v, lowrank, lora_b, idx)
    with pytest.raises(ValueError, match="same shape"):
        flash_lora_attention(q, k, v[:, :5], lowrank, lora_b, idx)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_lora_attention(q[:, :, :3], k, v, lowrank, lora_b, idx)
    with pytest.raises(ValueError, match="lora_b must be"):
        flash_lora_attention(q, k, v, lowrank, lora_b[:, :1], idx)
    with pytest.raises(ValueError, match="both lowrank and lora_b"):
        flash_lora_attention(q, k, v, lowrank, None, idx)
    with pytest.raises(ValueError, match="kv_lengths"):
        flash_lora_attention(q, k, v, lowrank, lora_b, idx, kv_lengths=jnp.array([3, 11]))


def test_bad_dtypes_raise():
    q, k, v, lowrank, lora_b, idx = _small_inputs()
    with pytest.raises(ValueError, match="dtype int32"):
        flash_lora_attention(q.astype(jnp.int32), k, v, lowrank, lora_b, idx)
    with pytest.raises(ValueError, match="dtypes differ"):
        flash_lora_attention(q, k, v.astype(jnp.bfloat16), lowrank, lora_b, idx)


def test_adapter_index_out_of_range_raises():
    q, k, v, lowrank, lora_b, _ = _small_inputs(a=2)
    for bad in ([0, 2], [-2, 0]):
        with pytest.raises(ValueError, match="adapter_index"):
            flash_lora_attention(q, k, v, lowrank, lora_b, jnp.array(bad, jnp.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_backend_rejects_unsupported_shapes(backend):
    q, k, v, lowrank, lora_b, idx = _small_inputs(h=96)
    with pytest.raises(UnsupportedError, match="head_dim"):
        flash_lora_attention(q, k, v, lowrank, lora_b, idx, implementation=backend, interpret=True)
    q, k, v, lowrank, lora_b, idx = _small_inputs(r=129)
    with pytest.raises(UnsupportedError, match="rank"):
        flash_lora_attention(q, k, v, lowrank, lora_b, idx, implementation=backend, interpret=True)


@pytest.mark.skipif(ON_GPU or ON_TPU, reason="checks the CPU host")
@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_backend_without_interpret_on_cpu_raises(backend):
    with pytest.raises(UnsupportedError, match="cpu"):
        flash_lora_attention(*_small_inputs(), implementation=backend)


@pytest.mark.skipif(ON_GPU or ON_TPU, reason="checks the CPU host")
def test_automatic_choice_on_cpu_is_the_reference():
    args = _small_inputs(h=96)  # no kernel takes H=96; the reference does
    out = flash_lora_attention(*args)
    ref = flash_lora_attention(*args, implementation="reference")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_dispatch_by_platform_and_shape():
    from pallas_kernels.flash_lora_attention.api import (GPU_THRESHOLDS, DispatchThresholds,
                                                         select_implementation)

    t = GPU_THRESHOLDS
    pick = functools.partial(select_implementation, platform="gpu", has_lowrank=True)
    assert pick(t_len=1) == "triton" and pick(t_len=t.decode_max_t) == "triton"
    assert pick(t_len=t.decode_max_t + 1) == ("cudnn" if t.cudnn_min_t <= t.decode_max_t + 1
                                              else "triton")
    assert pick(t_len=t.cudnn_min_t) == "cudnn" and pick(t_len=16384) == "cudnn"
    assert pick(t_len=t.cudnn_min_t - 1) == "triton"
    assert select_implementation(platform="gpu", t_len=t.cudnn_min_t_plain,
                                 has_lowrank=False) == "cudnn"
    assert pick(t_len=4096, per_token_index=True) == "reference"
    assert select_implementation(platform="tpu", t_len=4096, has_lowrank=True) == "mosaic_tpu"
    assert select_implementation(platform="cpu", t_len=1, has_lowrank=True) == "reference"
    custom = DispatchThresholds(decode_max_t=4, cudnn_min_t=8, cudnn_min_t_plain=8)
    assert pick(t_len=5, thresholds=custom) == "triton"
    assert pick(t_len=8, thresholds=custom) == "cudnn"


@pytest.mark.skipif(ON_GPU or ON_TPU, reason="checks the CPU host")
def test_explicit_implementation_overrides_the_dispatch():
    args = _small_inputs()
    ref = flash_lora_attention(*args, implementation="reference")
    forced = flash_lora_attention(*args, implementation="cudnn", interpret=True)
    assert relative_error(forced, ref) <= 2e-5
    with pytest.raises(UnsupportedError, match="NVIDIA GPU"):
        flash_lora_attention(*args, implementation="cudnn")
    with pytest.raises(ValueError, match="implementation='cuda'"):
        flash_lora_attention(*args, implementation="cuda")


def test_block_sizes_validate():
    with pytest.raises(ValueError, match="power of two"):
        triton_gpu.BlockSizes(block_q=48)
    with pytest.raises(ValueError, match="multiple of 8"):
        mosaic_tpu.BlockSizes(block_k=100)
    small_t = triton_gpu.default_block_sizes(t_len=20, head_dim=128, rank=8, dtype=jnp.bfloat16)
    assert small_t.block_q == 32
    with_adapter = triton_gpu.default_block_sizes(t_len=4096, head_dim=128, rank=16,
                                                  dtype=jnp.bfloat16)
    assert (with_adapter.block_k, with_adapter.rank_pad) == (128, 64)
    wide_rank = triton_gpu.default_block_sizes(t_len=4096, head_dim=64, rank=128, dtype=jnp.float16)
    assert wide_rank.block_q == 64


# ------------------------------------------------------------------------------------------------
# Lowering: the Triton kernels lower to Triton IR for an H100 and the Mosaic kernel to Mosaic for a
# TPU v5e, on any host (catches what interpret mode accepts but the compilers would not).


def _lower_for(backend, abstract_device, platform, case: Case):
    args, kwargs = make_inputs(case)
    module = triton_gpu if backend == "triton" else mosaic_tpu
    kv_lengths = kwargs.pop("kv_lengths")
    q_offset = kwargs.pop("q_offset", kv_lengths - case.t_len)
    causal = kwargs.pop("causal")
    call = jax.jit(lambda *a, **kw: module.flash_lora_attention(
        *a, **kw, causal=causal, sm_scale=0.125, block_sizes=None, interpret=False))
    kwargs.setdefault("layer", None)
    kwargs.setdefault("kv_index", None)
    kwargs.setdefault("lowrank_index", None)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=abstract_device)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = call.trace(*args, kv_lengths=kv_lengths, q_offset=q_offset, **kwargs).lower(
            lowering_platforms=(platform,))
    return lowered.as_text()


LOWERING_CASES = [
    Case(2, 77, 513, 8, 2, 128, 24, _BF16),
    Case(2, 1, 513, 32, 8, 128, 16, _BF16, layered=True),
    Case(2, 4, 100, 8, 2, 64, 8, _F32),
    Case(1, 40, 100, 4, 4, 256, 0, _F16, causal=False),
]


@pytest.mark.parametrize("case", LOWERING_CASES, ids=lambda c: c.name)
def test_triton_lowers_for_h100(case):
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                         platform="gpu")
    text = _lower_for("triton", device, "cuda", case)
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("case", LOWERING_CASES, ids=lambda c: c.name)
def test_mosaic_lowers_for_tpu(case):
    device = jax.sharding.AbstractDevice(device_kind="TPU v5e", num_cores=1, platform="tpu")
    text = _lower_for("mosaic_tpu", device, "tpu", case)
    assert "tpu_custom_call" in text
