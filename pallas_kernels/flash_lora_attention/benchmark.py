"""Benchmark of Flash-LoRA-Attention on the Llama-3.1-8B attention shape (N=32, K=8, H=128), bf16.

    python -m pallas_kernels.flash_lora_attention.benchmark [--json PATH] [--sections ...]

Prints a table and writes JSON with the device, versions, date and command. Measures in the same
run the two ceilings of the machine (device-to-device copy bandwidth, counting bytes read plus
written, and a bf16 8192^3 matrix product) and, for every shape:
  kernel    this kernel with the adapter term, R in {8, 16, 64}
  (a)       this kernel with lowrank=None (plain flash attention)
  cudnn     jax.nn.dot_product_attention(implementation="cudnn") on the base V
  (b)       materialise V + C @ B_agent, then cuDNN attention (R=16)
  (c)       the XLA reference (R=16), skipped where its [B, N, T, S] scores would not fit
Prefill: B=1, T=S in {1k, 4k, 16k, 32k}, causal; TFLOP/s counts the base attention FLOPs only
(4 * B * N * H * visible (query, key) pairs), the same count for every row, so it compares times.
Decode: T in {1, 4}, B in {1, 8}, S in {4k, 16k, 64k, 128k}; TB/s counts the bytes that must be
read (K + V + C; K + V for rows without adapter). cuDNN's decode rows with T=4 are non-causal (the
bottom-right causal mask of a decode step is not what is_causal means there); 4 query rows change
nothing measurable.

Timing: one jitted program runs the call on several input sets in turn (distinct caches, so repeated
calls do not read from L2; decode runs 16 calls per program, reusing caches with a fresh q, so the
host's dispatch time stays hidden), is dispatched a few times back to back and synchronised once;
the time per call is the median over trials. Never zeros: inputs are random normal.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from pallas_kernels.flash_lora_attention import flash_lora_attention
from pallas_kernels.flash_lora_attention import triton_gpu

N_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = jnp.bfloat16
RANKS = (8, 16, 64)
BASELINE_RANK = 16
NUM_AGENTS = 3
L2_BYTES = 50 * 2**20
PREFILL_LENGTHS = (1024, 4096, 16384, 32768)
DECODE_LENGTHS = (4096, 16384, 65536, 131072)
DECODE_BATCHES = (1, 8)
DECODE_T = (1, 4)


# ------------------------------------------------------------------------------------------------
# Timing


def time_per_call(fn, arg_sets, *, target_s=0.2, trials=7, min_calls=1) -> float:
    """Median seconds per call of ``fn`` over ``arg_sets`` (each a tuple of arrays).

    With ``min_calls`` above the number of sets, the sets are reused with a fresh q each time:
    identical calls in one program would be merged by XLA, and short calls need many per dispatch
    so that the host's dispatch time stays hidden.
    """
    calls = list(arg_sets)
    for i in range(len(calls), min_calls):
        q = calls[i % len(arg_sets)][0]
        fresh_q = jax.random.normal(jax.random.key(10_000 + i), q.shape, jnp.float32).astype(q.dtype)
        calls.append((fresh_q,) + tuple(calls[i % len(arg_sets)][1:]))
    many = jax.jit(lambda sets: [fn(*args) for args in sets])
    jax.block_until_ready(many(calls))  # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(many(calls))
    once = max(time.perf_counter() - start, 1e-6)
    inner = max(1, min(200, int(target_s / trials / once)))
    samples = []
    for _ in range(trials):
        start = time.perf_counter()
        out = None
        for _ in range(inner):
            out = many(calls)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / (inner * len(calls)))
    return statistics.median(samples)


def num_sets(bytes_per_call: int) -> int:
    """Enough distinct input sets that one round reads well over the L2 size."""
    return max(1, min(16, math.ceil(4 * L2_BYTES / max(bytes_per_call, 1))))


# ------------------------------------------------------------------------------------------------
# Machine ceilings


def measure_copy_bandwidth() -> dict:
    n = 2**29  # 1 GiB of bf16
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32).astype(DTYPE)
    seconds = time_per_call(lambda a: a + jnp.asarray(1, DTYPE), [(x,)])
    moved = 2 * n * 2
    return dict(bytes=moved, seconds=seconds, tb_per_s=moved / seconds / 1e12)


def measure_read_bandwidth() -> dict:
    """A read-dominated pass: the sum of a 4 GiB buffer (bytes read / time)."""
    n = 2**30
    x = jax.random.normal(jax.random.key(3), (n,), jnp.float32)
    seconds = time_per_call(lambda a: jnp.sum(a), [(x,)])
    return dict(bytes=n * 4, seconds=seconds, tb_per_s=n * 4 / seconds / 1e12)


def measure_matmul_rate() -> dict:
    n = 8192
    keys = jax.random.split(jax.random.key(1), 4)
    sets = [(jax.random.normal(keys[2 * i], (n, n), DTYPE),
             jax.random.normal(keys[2 * i + 1], (n, n), DTYPE)) for i in range(2)]
    seconds = time_per_call(lambda a, b: a @ b, sets)
    return dict(n=n, seconds=seconds, tflop_per_s=2 * n**3 / seconds / 1e12)


# ------------------------------------------------------------------------------------------------
# Inputs and the compared implementations


def make_set(seed, batch, t_len, s_len, rank):
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (batch, t_len, N_HEADS, HEAD_DIM), DTYPE)
    k = jax.random.normal(keys[1], (batch, s_len, KV_HEADS, HEAD_DIM), DTYPE)
    v = jax.random.normal(keys[2], (batch, s_len, KV_HEADS, HEAD_DIM), DTYPE)
    lowrank = jax.random.normal(keys[3], (batch, s_len, rank), DTYPE)
    lora_b = jax.random.normal(keys[4], (NUM_AGENTS, KV_HEADS, rank, HEAD_DIM), DTYPE) * 0.1
    adapter_index = jnp.arange(batch, dtype=jnp.int32) % NUM_AGENTS
    return q, k, v, lowrank, lora_b, adapter_index


def kernel_call(q, k, v, lowrank, lora_b, adapter_index, *, block_sizes=None):
    return flash_lora_attention(q, k, v, lowrank, lora_b, adapter_index, implementation="triton",
                                block_sizes=block_sizes)


def plain_kernel_call(q, k, v, lowrank, lora_b, adapter_index, *, block_sizes=None):
    del lowrank, lora_b, adapter_index
    return flash_lora_attention(q, k, v, implementation="triton", block_sizes=block_sizes)


def _cudnn(q, k, v, causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


def cudnn_call(q, k, v, lowrank, lora_b, adapter_index, *, causal):
    del lowrank, lora_b, adapter_index
    return _cudnn(q, k, v, causal)


def materialised_cudnn_call(q, k, v, lowrank, lora_b, adapter_index, *, causal):
    b_rows = jnp.take(lora_b, adapter_index, axis=0)  # [B, K, R, H]
    v_full = v + jnp.einsum("bsr,bkrh->bskh", lowrank, b_rows).astype(v.dtype)
    return _cudnn(q, k, v_full, causal)


def reference_call(q, k, v, lowrank, lora_b, adapter_index):
    return flash_lora_attention(q, k, v, lowrank, lora_b, adapter_index,
                                implementation="reference")


def reference_fits(batch, t_len, s_len) -> bool:
    scores = batch * N_HEADS * t_len * s_len * 4
    try:
        limit = jax.devices()[0].memory_stats()["bytes_limit"]
    except Exception:  # noqa: BLE001 - memory stats are optional
        limit = 40 * 2**30
    return 4 * scores < 0.5 * limit


# ------------------------------------------------------------------------------------------------
# Sections


@dataclasses.dataclass
class Row:
    section: str
    impl: str
    batch: int
    t_len: int
    s_len: int
    rank: int
    ms: float | None = None
    tflop_per_s: float | None = None
    tb_per_s: float | None = None
    rel_err_vs_reference: float | None = None
    note: str = ""


def _attention_flops(batch, t_len, s_len):
    pairs = sum(min(s_len, s_len - t_len + t + 1) for t in range(t_len)) if t_len < 64 else (
        t_len * (t_len + 1) // 2 + (s_len - t_len) * t_len)
    return 4 * batch * N_HEADS * HEAD_DIM * pairs


def _decode_bytes(batch, s_len, rank):
    itemsize = jnp.dtype(DTYPE).itemsize
    return batch * s_len * (2 * KV_HEADS * HEAD_DIM + rank) * itemsize


def _rel_err(out, ref):
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


def run_shape(section, batch, t_len, s_len, rows: list[Row], log):
    """All implementations at one shape; appends to ``rows``."""
    cudnn_causal = section == "prefill"
    flops = _attention_flops(batch, t_len, s_len)

    def record(impl, rank, fn, sets, *, with_c, note=""):
        row = Row(section, impl, batch, t_len, s_len, rank, note=note)
        try:
            seconds = time_per_call(fn, sets, min_calls=16 if section == "decode" else 1)
            row.ms = seconds * 1e3
            if section == "prefill":
                row.tflop_per_s = flops / seconds / 1e12
            else:
                row.tb_per_s = _decode_bytes(batch, s_len, rank if with_c else 0) / seconds / 1e12
        except Exception as exc:  # noqa: BLE001 - a failing baseline is a result, not a crash
            row.note = (note + " " if note else "") + f"failed: {type(exc).__name__}: {exc}"[:300]
            traceback.print_exc(file=sys.stderr)
        rows.append(row)
        log(row)
        return row

    for rank in RANKS:
        per_call = _decode_bytes(batch, s_len, rank) + batch * t_len * N_HEADS * HEAD_DIM * 2
        sets = [make_set(100 * rank + i, batch, t_len, s_len, rank)
                for i in range(num_sets(per_call))]
        record("kernel", rank, kernel_call, sets, with_c=True)
        if rank == BASELINE_RANK:
            record("(a) kernel, no LoRA", 0, plain_kernel_call, sets, with_c=False)
            record("cudnn, no LoRA", 0, functools.partial(cudnn_call, causal=cudnn_causal), sets,
                   with_c=False, note="" if cudnn_causal or t_len == 1 else "non-causal")
            record("(b) V+CB then cudnn", rank,
                   functools.partial(materialised_cudnn_call, causal=cudnn_causal), sets,
                   with_c=True, note="" if cudnn_causal or t_len == 1 else "non-causal")
            if reference_fits(batch, t_len, s_len):
                ref_row = record("(c) XLA reference", rank, reference_call, sets[:1], with_c=True)
                if ref_row.ms is not None:
                    try:
                        out = jax.jit(kernel_call)(*sets[0])
                        ref = jax.jit(reference_call)(*sets[0])
                        ref_row.rel_err_vs_reference = _rel_err(out, ref)
                    except Exception as exc:  # noqa: BLE001
                        ref_row.note += f" error check failed: {exc}"[:200]
            else:
                rows.append(Row(section, "(c) XLA reference", batch, t_len, s_len, rank,
                                note="skipped: [B,N,T,S] f32 scores would not fit"))
                log(rows[-1])
        del sets


DISPATCH_SHAPES = [(t, s_len) for s_len in (4096, 16384, 32768)
                   for t in (32, 64, 128, 256, 512, 1024, 2048, 4096) if t <= s_len]


def offset_call(impl, q, k, v, lowrank, lora_b, adapter_index, *, with_lora=True):
    """A chunk of T queries at the end of an S-key cache (q_offset = S - T), causal."""
    s_len, t_len = k.shape[1], q.shape[1]
    offset = jnp.full((q.shape[0],), s_len - t_len, jnp.int32)
    if not with_lora:
        lowrank = lora_b = adapter_index = None
    return flash_lora_attention(q, k, v, lowrank, lora_b, adapter_index, q_offset=offset,
                                implementation=impl)


def run_dispatch(rows: list[Row], log, shapes=None):
    """Where cuDNN (adapter term materialised) overtakes the Flash-LoRA kernels: a chunk of T
    queries at the end of an S-key cache, R=16, both forced and as ``implementation=None``
    chooses; and the 16k prefill chunk against plain cuDNN attention."""
    cases = [(t, s_len, "chunk") for t, s_len in (shapes or DISPATCH_SHAPES)] + [
        (16384, 16384, "prefill")]
    for t_len, s_len, kind in cases:
        per_call = _decode_bytes(1, s_len, BASELINE_RANK)
        sets = [make_set(31 + i, 1, t_len, s_len, BASELINE_RANK)
                for i in range(num_sets(per_call))]
        flops = _attention_flops(1, t_len, s_len)
        runs = [("triton", functools.partial(offset_call, "triton")),
                ("cudnn (V+CB, two parts)", functools.partial(offset_call, "cudnn")),
                ("auto", functools.partial(offset_call, None)),
                ("auto, no LoRA", functools.partial(offset_call, None, with_lora=False))]
        if kind == "prefill":
            runs.append(("cudnn plain (is_causal)", functools.partial(cudnn_call, causal=True)))
        for label, call in runs:
            row = Row("dispatch-" + kind, label, 1, t_len, s_len,
                      0 if "no LoRA" in label or "plain" in label else BASELINE_RANK)
            try:
                seconds = time_per_call(call, sets)
                row.ms = seconds * 1e3
                row.tflop_per_s = flops / seconds / 1e12
                if label.startswith("cudnn (V"):
                    out = jax.jit(call)(*sets[0])
                    ref = jax.jit(functools.partial(offset_call, "reference"))(*sets[0]) \
                        if reference_fits(1, t_len, s_len) else None
                    if ref is not None:
                        row.rel_err_vs_reference = _rel_err(out, ref)
            except Exception as exc:  # noqa: BLE001
                row.note = f"failed: {type(exc).__name__}: {exc}"[:300]
                traceback.print_exc(file=sys.stderr)
            rows.append(row)
            log(row)
        del sets


# (block_q, block_k, num_warps, num_stages, rank_pad) at R=16, and the same without adapter
PREFILL_VARIANTS = [(128, 64, 8, 3, 16), (128, 128, 8, 2, 16), (64, 128, 4, 2, 16),
                    (128, 64, 8, 3, 32), (128, 64, 8, 3, 64), (128, 128, 8, 2, 64),
                    (64, 64, 4, 3, 16), (128, 64, 8, 2, 16)]
# (decode_block_k, num_warps, num_stages, splits or None for automatic, decode_rank_pad)
DECODE_VARIANTS = [(64, 4, 3, None, 64), (64, 4, 3, None, 16), (128, 4, 3, None, 64),
                   (64, 4, 3, 8, 64), (64, 4, 3, 16, 64), (64, 4, 3, 32, 64), (64, 4, 3, 64, 64),
                   (32, 4, 4, None, 64), (128, 4, 2, 16, 64), (64, 2, 3, None, 64)]
VARIANT_SHAPES = [("prefill", 1, 16384, 16384),
                  ("decode", 1, 1, 16384), ("decode", 1, 1, 131072), ("decode", 8, 1, 16384),
                  ("decode", 8, 4, 131072)]


def run_variants(rows: list[Row], log):
    """Block-size variants of the kernel (R=16, and without adapter for prefill)."""
    for section, batch, t_len, s_len in VARIANT_SHAPES:
        per_call = _decode_bytes(batch, s_len, BASELINE_RANK)
        sets = [make_set(7 + i, batch, t_len, s_len, BASELINE_RANK)
                for i in range(num_sets(per_call))]
        flops = _attention_flops(batch, t_len, s_len)
        runs = []
        if section == "prefill":
            for bq, bk, warps, stages, rank_pad in PREFILL_VARIANTS:
                blocks = triton_gpu.BlockSizes(block_q=bq, block_k=bk, num_warps=warps,
                                               num_stages=stages, rank_pad=rank_pad)
                label = f"bq{bq} bk{bk} w{warps} s{stages}"
                runs.append((label + f" Rp{rank_pad}", kernel_call, blocks, True))
                if rank_pad == 16:
                    runs.append((label + " no LoRA", plain_kernel_call, blocks, False))
        else:
            for bk, warps, stages, splits, rank_pad in DECODE_VARIANTS:
                blocks = triton_gpu.BlockSizes(decode_block_k=bk, decode_num_warps=warps,
                                               decode_num_stages=stages, decode_splits=splits,
                                               decode_rank_pad=rank_pad)
                n_splits, _ = triton_gpu._decode_splits(blocks, batch=batch, kv_heads=KV_HEADS,
                                                        s_len=s_len, block_k=bk)
                label = f"bk{bk} w{warps} s{stages} splits{n_splits}{'' if splits else '(auto)'}"
                runs.append((label + f" Rp{rank_pad}", kernel_call, blocks, True))
                if rank_pad == 64 and splits is None and bk == 64 and warps == 4:
                    runs.append((label + " no LoRA", plain_kernel_call, blocks, False))
        for label, call, blocks, with_c in runs:
            row = Row("variant-" + section, label, batch, t_len, s_len,
                      BASELINE_RANK if with_c else 0)
            try:
                seconds = time_per_call(functools.partial(call, block_sizes=blocks), sets,
                                        min_calls=16 if section == "decode" else 1)
                row.ms = seconds * 1e3
                if section == "prefill":
                    row.tflop_per_s = flops / seconds / 1e12
                else:
                    row.tb_per_s = _decode_bytes(batch, s_len, row.rank) / seconds / 1e12
            except Exception as exc:  # noqa: BLE001
                row.note = f"failed: {type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            log(row)
        del sets


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_table(rows: list[Row]) -> str:
    lines = [f"{'section':<16} {'impl':<34} {'B':>2} {'T':>6} {'S':>7} {'R':>3} {'ms':>9} "
             f"{'TFLOP/s':>8} {'TB/s':>6} {'err':>8}  note"]
    for r in rows:
        lines.append(f"{r.section:<16} {r.impl:<34} {r.batch:>2} {r.t_len:>6} {r.s_len:>7} "
                     f"{r.rank:>3} {_fmt(r.ms, '9.4f')} {_fmt(r.tflop_per_s, '8.1f')} "
                     f"{_fmt(r.tb_per_s, '6.2f')} {_fmt(r.rel_err_vs_reference, '8.1e')}  "
                     f"{r.note[:60]}")
    return "\n".join(lines)


def summarize(rows: list[Row], ceilings: dict) -> list[str]:
    """The targets, shape by shape: LoRA overhead, prefill vs cuDNN, decode bandwidth and speedup."""
    by_shape: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        if r.section in ("prefill", "decode") and r.ms is not None:
            key = (r.section, r.batch, r.t_len, r.s_len)
            by_shape.setdefault(key, {})[f"{r.impl}|{r.rank}"] = r
    copy = ceilings.get("copy", {}).get("tb_per_s")
    lines = []
    for (section, batch, t_len, s_len), got in by_shape.items():
        plain = got.get("(a) kernel, no LoRA|0")
        parts = [f"{section} B{batch} T{t_len} S{s_len}:"]
        for rank in (8, 16):
            lora = got.get(f"kernel|{rank}")
            if lora and plain:
                parts.append(f"LoRA overhead R{rank} {100 * (lora.ms / plain.ms - 1):+.1f}% "
                             "(target <= +10%)")
        kernel = got.get(f"kernel|{BASELINE_RANK}")
        cudnn = got.get("cudnn, no LoRA|0")
        materialised = got.get(f"(b) V+CB then cudnn|{BASELINE_RANK}")
        if section == "prefill" and kernel and cudnn:
            parts.append(f"kernel/cuDNN throughput {cudnn.ms / kernel.ms:.2f}x (target >= 0.75)")
            if plain:
                parts.append(f"(a)/cuDNN {cudnn.ms / plain.ms:.2f}x")
        if section == "decode" and kernel:
            if copy:
                parts.append(f"{100 * kernel.tb_per_s / copy:.0f}% of copy bandwidth"
                             + (" (target >= 80%)" if s_len >= 16384 else ""))
            if materialised:
                parts.append(f"{materialised.ms / kernel.ms:.2f}x faster than (b) (target >= 1.5)")
        lines.append(" ".join(parts))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="flash_lora_attention_benchmark.json")
    parser.add_argument("--sections", default="ceilings,prefill,decode,dispatch",
                        help="comma-separated subset of ceilings,variants,prefill,decode,dispatch")
    parser.add_argument("--prefill-lengths", default=",".join(map(str, PREFILL_LENGTHS)))
    parser.add_argument("--decode-lengths", default=",".join(map(str, DECODE_LENGTHS)))
    parser.add_argument("--dispatch-shapes", default=None,
                        help="T:S pairs of the dispatch section (default: T 32..4096 at S 4k, 16k, "
                             "32k), e.g. 64:16384,256:16384")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    device = jax.devices()[0]
    result = dict(
        device=device.device_kind, platform=device.platform, jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([sys.executable, "-m", "pallas_kernels.flash_lora_attention.benchmark"]
                         + (argv if argv is not None else sys.argv[1:])),
        shape=dict(n_heads=N_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="bfloat16"),
        ceilings={}, rows=[])
    rows: list[Row] = []

    def save():
        result["rows"] = [dataclasses.asdict(r) for r in rows]
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)

    def log(row: Row):
        print(format_table([row]).splitlines()[1], flush=True)
        save()

    print(f"device {device.device_kind}, jax {jax.__version__}, {result['date']}", flush=True)
    if "ceilings" in sections:
        result["ceilings"]["read"] = measure_read_bandwidth()
        result["ceilings"]["copy"] = measure_copy_bandwidth()
        result["ceilings"]["matmul_bf16"] = measure_matmul_rate()
        print(f"read {result['ceilings']['read']['tb_per_s']:.2f} TB/s, "
              f"copy {result['ceilings']['copy']['tb_per_s']:.2f} TB/s (read + write), "
              f"bf16 matmul {result['ceilings']['matmul_bf16']['tflop_per_s']:.0f} TFLOP/s",
              flush=True)
        save()
    if "prefill" in sections:
        for s_len in map(int, args.prefill_lengths.split(",")):
            run_shape("prefill", 1, s_len, s_len, rows, log)
    if "decode" in sections:
        for s_len in map(int, args.decode_lengths.split(",")):
            for batch in DECODE_BATCHES:
                for t_len in DECODE_T:
                    run_shape("decode", batch, t_len, s_len, rows, log)
    if "variants" in sections:
        run_variants(rows, log)
    if "dispatch" in sections:
        shapes = None
        if args.dispatch_shapes:
            shapes = [tuple(map(int, item.split(":"))) for item in args.dispatch_shapes.split(",")]
        run_dispatch(rows, log, shapes)
    result["targets"] = summarize(rows, result["ceilings"])
    save()
    print()
    print(format_table(rows))
    print()
    print("\n".join(result["targets"]))
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
