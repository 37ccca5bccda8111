"""Several GPUs of one host (or several hosts): tensor-parallel decode and rollouts, data-parallel
training, each against one GPU and against the per-GPU floor.

    python -m eval.bench_multi_gpu --model llama3_1_8b --meshes 1x1,1x2,1x4        # TP 1 / 2 / 4
    python -m eval.bench_multi_gpu --model llama3_1_70b --meshes 1x4,1x8 --train-meshes 1x8 \\
        --train-case llama-3.1-70b:8:4096:1:full
    python -m eval.bench_multi_gpu --parts train --train-meshes 1x1,2x1,4x1,8x1
    python -m eval.bench_multi_gpu --compare-loss runs/lc-1gpu runs/lc-8gpu   # two train runs
    python -m eval.bench_multi_gpu --cpu-smoke        # every part, tiny shapes, 8 CPU devices
    python -m eval.bench_multi_gpu --print-commands   # the runs for 2, 4 and 8 GPUs

A mesh is DATAxMODEL: trajectories (or training rows) split over DATA groups of MODEL devices,
each group holding the weights split over its MODEL devices (``lragent_jax.sharding``). Random
weights of the preset's shapes (speed does not depend on the values), made directly in place,
one layer at a time (a 70B model never sits on one device), in the per-layer inference layout
with random plan / action / reflect adapters (rank ``--rank`` on q, v, o, gate, up, down; their A
appended to the weights).

Parts:
- ``decode``: per mesh and (rows per data group, context): the decode step of a base+LR shared
  session (``eval.bench_generate.measure``: (a turn decoding N tokens - one decoding 1) / (N - 1),
  every step over ``context`` keys), its prefill, and the per-GPU floor: the bytes one GPU must
  read per step (its shard of every weight, its rows' K and V of its kv heads, its rows' low-rank
  entries, which every model shard holds whole) over the read bandwidth measured on one GPU
  (``eval.floors.measure_ceilings``). The all-reduces (two per layer, [rows, D]) are not in the
  floor.
- ``rollout``: episodes/s of ReAct-shaped trace episodes (``eval.traces``) of ``--length`` tokens
  through the rollout engine on a session of ``--rows`` rows per data group
  (``eval.throughput.measure``), after one untimed wave of episodes.
- ``train``: the training step of ``train.benchmark`` (``--train-case`` rows per data group;
  global batch = rows x DATA) on each training mesh: tokens/s, MFU per GPU (model FLOPs / s /
  devices / the bf16 matmul rate measured on one GPU), tokens/s against the first mesh, and the
  first step's loss per token (the same batch for equal global batches).
Every row says how it compares with the first mesh of its list (make that 1x1). Results go to
``--out`` (JSON with device, versions, date, command and the NCCL_* variables as found: this
script never sets any; NVLink multicast stays as the machine has it) after every row.

Multi-host: start one process per host with ``--coordinator HOST:PORT --num-processes N
--process-id I`` (the devices of all hosts form the meshes; process 0 prints and writes).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
from pathlib import Path

from eval.common import positive_int_list

MESH_HELP = "comma-separated DATAxMODEL meshes, e.g. 1x1,1x2,1x4 (the first is the baseline)"
ROLES = ("plan", "action", "reflect")
TARGETS = ("q", "v", "o", "gate", "up", "down")
PARTS = ("decode", "rollout", "train")
SMOKE_DEVICES = 8


# ----------------------------------------------------------------------------- arguments


def _meshes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in (v for v in text.split(",") if v):
        parts = item.lower().split("x")
        try:
            data, model = (int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"mesh {item!r} must be DATAxMODEL, e.g. 2x4")
        if data < 1 or model < 1:
            raise argparse.ArgumentTypeError(f"mesh {item!r}: both sizes must be >= 1")
        out.append((data, model))
    if not out:
        raise argparse.ArgumentTypeError("no mesh given")
    return out



def _parts(text: str) -> list[str]:
    values = [v for v in text.split(",") if v]
    bad = [v for v in values if v not in PARTS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"parts must be from {', '.join(PARTS)}; got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.bench_multi_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", type=_parts, default=list(PARTS), help="decode,rollout,train")
    p.add_argument("--model", default="llama3_1_8b",
                   help="model preset for decode and rollout (random weights); default llama3_1_8b")
    p.add_argument("--meshes", type=_meshes, default=None,
                   help=MESH_HELP + "; default 1x1,1x2,1x4 (1x4,1x8 for a 70B preset)")
    p.add_argument("--batch", type=positive_int_list, default=[1, 16],
                   help="decode rows per data group")
    p.add_argument("--context", type=positive_int_list, default=[2048, 16384],
                   help="keys each decode step attends over")
    p.add_argument("--new", type=int, default=64, help="decoded tokens per timed turn (>= 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed decode repeats (median)")
    p.add_argument("--rank", type=int, default=8, help="adapter rank")
    p.add_argument("--attn", default=None, help="attention backend (default: chosen per call)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill step")
    p.add_argument("--rows", type=int, default=16, help="rollout rows per data group")
    p.add_argument("--episodes", type=int, default=64, help="timed rollout episodes per data group")
    p.add_argument("--length", type=int, default=8192, help="tokens of each rollout episode")
    p.add_argument("--mode", default="base_lowrank_shared",
                   help="cache-sharing mode of the rollout")
    p.add_argument("--train-case", default="llama-3.1-8b:8:4096:1:dots",
                   help="MODEL:RANK:SEQ:ROWS:REMAT of train.benchmark, ROWS per data group")
    p.add_argument("--train-meshes", type=_meshes, default=None,
                   help=MESH_HELP + "; default 1x1,2x1,4x1,8x1 as far as the devices go")
    p.add_argument("--train-steps", type=int, default=6, help="timed training steps")
    p.add_argument("--no-floors", action="store_true", help="skip measuring the ceilings")
    p.add_argument("--out", default="results/bench_multi_gpu.json", help="JSON output path")
    p.add_argument("--cpu-smoke", action="store_true",
                   help=f"run every part at tiny size on {SMOKE_DEVICES} forced CPU devices "
                        "(checks the program, measures nothing)")
    p.add_argument("--print-commands", action="store_true",
                   help="print the commands for 2, 4 and 8 GPUs and exit")
    p.add_argument("--compare-loss", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                   help="compare the per-step losses of two python -m train run folders and exit")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-host: address of process 0 for jax.distributed")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: process count")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process' rank")
    return p


def check(args, parser) -> None:
    for name in ("new", "repeats", "rank", "rows", "episodes", "length", "train_steps"):
        if getattr(args, name) < (2 if name == "new" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'new' else 1}; "
                         f"got {getattr(args, name)}")
    if args.prefill_chunk < 1 or args.prefill_chunk & (args.prefill_chunk - 1):
        parser.error(f"--prefill-chunk must be a power of two; got {args.prefill_chunk}")


def apply_smoke(args) -> None:
    """Tiny shapes for every part; the meshes cover TP 1..8 and DP x TP on 8 CPU devices."""
    args.model = "tiny"
    args.meshes = args.meshes or [(1, 1), (1, 2), (1, 8), (2, 4)]
    # 32 new tokens, median of 3: the step is a difference of two timings (32 tokens - 1), which
    # with 4 tokens and one timing came out negative once on a busy 2-core machine
    args.batch, args.context, args.new, args.repeats = [2], [64], 32, 3
    args.rows, args.episodes, args.length, args.prefill_chunk = 2, 2, 256, 64
    args.train_case = "tiny:4:64:2:none"
    args.train_meshes = args.train_meshes or [(1, 1), (1, 2), (2, 1), (8, 1), (4, 2)]
    args.train_steps = 1
    args.no_floors = True


# ----------------------------------------------------------------------------- commands


def gpu_commands() -> str:
    """What to run on 2, 4 and 8 GPUs of one host, one part per command (each a few minutes; the
    NCCL environment left as the machine has it)."""
    m = "python -m eval.bench_multi_gpu"
    out = "results/multi_gpu"
    lines = []
    for gpus, meshes, train_meshes in ((2, "1x1,1x2,2x1", "1x1,1x2,2x1"),
                                       (4, "1x1,1x2,1x4,2x2,4x1", "1x1,1x4,2x1,4x1,2x2"),
                                       (8, "1x1,1x4,2x4,8x1", "1x1,1x8,2x1,4x1,8x1")):
        lines += [f"# {gpus} GPUs: Llama-3.1-8B decode and rollouts at TP / DP {meshes}; "
                  f"training at {train_meshes} against one GPU",
                  f"{m} --parts decode --model llama3_1_8b --meshes {meshes} "
                  f"--out {out}/{gpus}gpu-8b-decode.json",
                  f"{m} --parts rollout --model llama3_1_8b --meshes {meshes} --episodes 32 "
                  f"--out {out}/{gpus}gpu-8b-rollout.json",
                  f"{m} --parts train --train-meshes {train_meshes} "
                  f"--out {out}/{gpus}gpu-8b-train.json"]
    mem = "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"
    lines += ["# 8 GPUs: the 70B shape at TP 4 and 8 (and DP 2 x TP 4); training with its base "
              "weights split over 8",
              f"{mem} {m} --parts decode --model llama3_1_70b --meshes 1x4,1x8,2x4 "
              f"--out {out}/8gpu-70b-decode.json",
              f"{mem} {m} --parts rollout --model llama3_1_70b --meshes 1x4,1x8 --episodes 16 "
              f"--out {out}/8gpu-70b-rollout.json",
              f"{mem} {m} --parts train --train-case llama-3.1-70b:8:4096:1:full "
              f"--train-meshes 1x8,2x4 --out {out}/8gpu-70b-train.json",
              "# the loss curve of data-parallel training (and with sharded base weights) against "
              "one GPU, same global batch"]
    train = ("python -m train --model llama-3.1-8b --random-weights --max-steps 20 --batch-size 8 "
             "--kb-train 200 --max-len 2304 --valid-samples 16 --no-progress")
    for name, mesh in (("1gpu", "--mesh-data 1"), ("8gpu", "--mesh-data 8"),
                       ("4x2gpu", "--mesh-data 4 --mesh-model 2")):
        lines.append(f"{train} {mesh} --out runs/lc-{name}")
    lines += [f"{m} --compare-loss runs/lc-1gpu runs/lc-8gpu",
              f"{m} --compare-loss runs/lc-1gpu runs/lc-4x2gpu",
              "# the multi-host code path on one host: one process per GPU (meshes span them all)",
              f"for i in 0 1; do CUDA_VISIBLE_DEVICES=$i {m} --parts decode,train --meshes 2x1,1x2 "
              f"--train-meshes 2x1,1x2 --coordinator 127.0.0.1:12356 --num-processes 2 "
              f"--process-id $i --out {out}/2gpu-8b-2processes.json & done; wait"]
    return "\n".join(lines)


def compare_loss(run_a: str, run_b: str) -> dict:
    """Per-step training losses of two run folders and their largest relative difference."""
    def losses(run):
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            raise ValueError(f"{run}: no metrics.jsonl (not a python -m train run folder)")
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {r["step"]: r["loss"] for r in records if r.get("event") == "step"}

    a, b = losses(run_a), losses(run_b)
    steps = sorted(set(a) & set(b))
    if not steps:
        raise ValueError(f"{run_a} and {run_b} share no logged step")
    rel = [abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in steps]
    return {"steps": steps, "loss_a": [a[s] for s in steps], "loss_b": [b[s] for s in steps],
            "max_relative_difference": max(rel), "step_of_max": steps[rel.index(max(rel))]}


# ----------------------------------------------------------------------------- weights in place


def _config(name: str):
    from lragent_jax.config import ModelConfig

    if name == "tiny":  # GQA, kv heads divisible by 8: every TP up to 8 splits it
        return ModelConfig.tiny(name="tiny-gqa", vocab_size=256, num_heads=16, num_kv_heads=8,
                                head_dim=16, hidden_size=128, intermediate_size=256,
                                num_layers=2, eos_token_ids=())
    return ModelConfig.preset(name).replace(eos_token_ids=())


def random_sharded_params(config, mesh, dtype, seed: int = 0) -> dict:
    """Random weights of ``config`` in the inference layout for ``mesh``, each layer made by one
    jitted call straight into its shardings (``sharding.inference_param_specs``): no device ever
    holds more than its shards plus one layer's float32 draws of its shard."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from lragent_jax import sharding

    m = sharding.model_size(mesh)
    D, N, K, H, F, V = (config.hidden_size, config.num_heads, config.num_kv_heads,
                        config.head_dim, config.intermediate_size, config.vocab_size)
    layer_shapes = {"attn_norm": (D,), "mlp_norm": (D,), "qkv": (D, m, (N // m + 2 * (K // m)) * H),
                    "o": (N * H, D), "gate_up": (D, m, 2 * (F // m)), "down": (F, D)}
    if config.qkv_bias:
        layer_shapes["qkv_bias"] = (m, (N // m + 2 * (K // m)) * H)
    top_shapes = {"embed": (V, D), "final_norm": (D,)}
    if not config.tie_embeddings:
        top_shapes["lm_head"] = (D, V)
    abstract = {**{k: jax.ShapeDtypeStruct(s, dtype) for k, s in top_shapes.items()},
                "layers": tuple({k: jax.ShapeDtypeStruct(s, dtype) for k, s in
                                 layer_shapes.items()} for _ in range(config.num_layers))}
    specs = sharding.inference_param_specs(abstract, config, mesh)
    fan_in = {"qkv": D, "gate_up": D, "o": N * H, "down": F, "lm_head": D}

    def draw(key, shapes):
        out = {}
        for i, (name, shape) in enumerate(sorted(shapes.items())):
            x = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
            if "norm" in name:
                x = 1.0 + 0.1 * x
            elif "bias" in name:
                x = 0.1 * x
            elif name in fan_in:
                x = x / math.sqrt(fan_in[name])
            out[name] = x.astype(dtype)
        return out

    def make(key, shapes, spec_tree):
        shardings = {k: NamedSharding(mesh, spec_tree[k]) for k in shapes}
        return jax.jit(lambda k: draw(k, shapes), out_shardings=shardings)(key)

    key = jax.random.key(seed)
    top = make(jax.random.fold_in(key, 10 ** 6), top_shapes, specs)
    layers = tuple(make(jax.random.fold_in(key, i), layer_shapes, specs["layers"][i])
                   for i in range(config.num_layers))
    return {**top, "layers": layers}


def build_model(config, mesh, args, dtype):
    """(params with the adapters' A appended, placed for ``mesh``; lora; adapters replicated)."""
    import jax

    from lragent_jax import sharding
    from lragent_jax.config import LoraConfig
    from lragent_jax.inference import fuse_adapters
    from lragent_jax.lora import init_adapters

    params = random_sharded_params(config, mesh, dtype)
    lora = LoraConfig(rank=args.rank, targets=TARGETS, agents=ROLES)
    adapters = sharding.replicate(
        jax.jit(init_adapters, static_argnums=(1, 2), static_argnames=("dtype", "b_scale"))(
            jax.random.key(1), config, lora, dtype=dtype, b_scale=0.02), mesh)
    params = sharding.shard_inference_params(
        fuse_adapters(params, config, adapters, lora, donate=True), config, mesh)
    return params, lora, adapters


def per_device_step_bytes(params, config, *, rows: int, lowrank_rows: int, context: int,
                          cache_dtype, rank: int, model: int) -> dict:
    """Bytes one device reads in a decode step: its shard of every layer weight, the output head
    (the embedding only for its ``rows`` gathered rows unless tied), and per layer its ``rows``
    rows' K and V of its K/model kv heads plus ``lowrank_rows`` rows' low-rank entries (whole on
    every model shard). ``rows``: cache rows of one data group."""
    import jax
    import jax.numpy as jnp

    def local(x):
        return int(x.addressable_shards[0].data.nbytes)

    weights = sum(local(x) for x in jax.tree.leaves(params["layers"])) + local(params["final_norm"])
    embed = params["embed"]
    if config.tie_embeddings:
        weights += local(embed)
    else:
        weights += local(params["lm_head"]) + rows * embed.shape[1] * embed.dtype.itemsize
    item = jnp.dtype(cache_dtype).itemsize
    kv = config.num_layers * 2 * rows * context * (config.num_kv_heads // model) \
        * config.head_dim * item
    lowrank = config.num_layers * lowrank_rows * context * rank * item
    return {"weights": weights, "kv": kv, "lowrank": lowrank, "total": weights + kv + lowrank}


# ----------------------------------------------------------------------------- the parts


def _mesh(data: int, model: int):
    import jax

    from lragent_jax import sharding

    need = data * model
    if need > jax.device_count():
        raise ValueError(f"mesh {data}x{model} needs {need} devices; {jax.device_count()} "
                         "available")
    if jax.process_count() > 1 and need != jax.device_count():
        raise ValueError(f"mesh {data}x{model} uses {need} of the {jax.device_count()} devices; "
                         f"with {jax.process_count()} processes every mesh must span all devices "
                         "(each process runs every computation)")
    return sharding.make_mesh(data=data, model=model, devices=jax.devices()[:need])


def _relative(rows: list[dict], key: str, value: str, higher_is_better: bool) -> None:
    """Add ``<value>_vs_first``: this row's value against the first row with the same ``key``."""
    first: dict = {}
    for row in rows:
        if value not in row:
            continue
        base = first.setdefault(row[key], row[value])
        row[f"{value}_vs_first"] = (row[value] / base) if higher_is_better else (base / row[value])


def run_decode(args, ceilings, record) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from eval.bench_generate import measure
    from eval.common import NullTokenizer
    from lragent_jax.session import Session

    config, dtype = _config(args.model), jnp.bfloat16
    rows_out = []
    for data, model in args.meshes:
        mesh = _mesh(data, model)
        params, lora, adapters = build_model(config, mesh, args, dtype)
        for batch in args.batch:
            for context in args.context:
                capacity = -(-(context + args.new + 8) // 256) * 256
                session = Session(config, params, NullTokenizer(), adapters=adapters, lora=lora,
                                  mode="base_lowrank_shared", batch=batch * data,
                                  capacity=capacity, attn_impl=args.attn,
                                  prefill_chunk=min(args.prefill_chunk,
                                                    1 << (context - 1).bit_length()),
                                  min_new_bucket=64, mesh=mesh)
                m = measure(session, context, args.new, args.repeats, "plan",
                            np.random.default_rng(0))
                step = m["decode_step_s"]
                row = {"part": "decode", "model": config.name, "mesh": f"{data}x{model}",
                       "data": data, "tp": model, "devices": data * model,
                       "rows_per_group": batch, "rows": batch * data, "context": context,
                       "case": f"{batch}:{context}", "decode_step_ms": step * 1e3,
                       "decode_tok_s": batch * data / step,
                       "prefill_tok_s": batch * data * context / m["prefill_s"]}
                need = per_device_step_bytes(params, config, rows=batch, lowrank_rows=batch,
                                             context=context, cache_dtype=session.spec.dtype,
                                             rank=session.spec.rank, model=model)
                row["bytes_per_gpu"] = need
                if ceilings:
                    floor = need["total"] / ceilings["read_Bps"]
                    row.update(floor_step_ms=floor * 1e3, step_over_floor=step / floor)
                rows_out.append(row)
                _relative(rows_out, "case", "decode_tok_s", True)
                record(rows_out)
                del session
                gc.collect()
        del params, adapters
        gc.collect()
        jax.clear_caches()
    return rows_out


def run_rollout(args, record) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from eval.common import NullTokenizer
    from eval.throughput import measure, trace_capacity
    from eval.traces import generate_trace
    from lragent_jax.rollout import Schedule, TraceEpisode
    from lragent_jax.session import Session

    config, dtype = _config(args.model), jnp.bfloat16
    capacity = trace_capacity(args.length)
    rows_out = []
    for data, model in args.meshes:
        mesh = _mesh(data, model)
        params, lora, adapters = build_model(config, mesh, args, dtype)
        rows = args.rows * data
        session = Session(config, params, NullTokenizer(), adapters=adapters, lora=lora,
                          mode=args.mode, batch=rows, capacity=capacity, attn_impl=args.attn,
                          prefill_chunk=min(args.prefill_chunk, capacity), min_new_bucket=64,
                          mesh=mesh)

        def make(start, count):
            return (TraceEpisode(generate_trace(args.length, start + i), seed=start + i)
                    for i in range(count))

        m = measure(session, make, episodes=args.episodes * data, warmup=rows,
                    schedule=Schedule(), label=f"{config.name} {data}x{model}",
                    progress=_is_main())
        row = {"part": "rollout", "model": config.name, "mesh": f"{data}x{model}", "data": data,
               "tp": model, "devices": data * model, "mode": args.mode, "length": args.length,
               "case": f"{args.mode}:{args.length}",
               **{k: m[k] for k in ("rows", "episodes", "failed", "seconds", "episodes_s",
                                    "gen_tok_s", "ttft_p50_s", "ttft_p99_s", "turn_p50_s",
                                    "calls", "compile_s_in_timed", "cache_bytes")}}
        if m["failed"]:
            row["errors"] = m["errors"]
        rows_out.append(row)
        _relative(rows_out, "case", "episodes_s", True)
        record(rows_out)
        del session, params, adapters
        gc.collect()
        jax.clear_caches()
    return rows_out


def run_train(args, record) -> list[dict]:
    import jax

    from train.benchmark import Case, matmul_peak, run_case
    from train.placement import Placement

    base = Case.parse(args.train_case)
    config = _config("tiny") if base.model == "tiny" else None
    meshes = args.train_meshes or [(d, 1) for d in (1, 2, 4, 8) if d <= jax.device_count()]
    peak = matmul_peak(256 if jax.default_backend() == "cpu" else 8192)
    rows_out = []
    for data, model in meshes:
        _mesh(data, model)  # the same check and message as the other parts
        case = Case(base.model, base.rank, base.seq, base.batch * data, base.remat)
        result = run_case(case, args.train_steps, peak, Placement(data, model), config=config)
        devices = data * model
        row = {"part": "train", "mesh": f"{data}x{model}", "data": data, "tp": model,
               "devices": devices, "case": str(base), "global_rows": case.batch,
               "tokens_per_s": result["tokens_per_s"], "step_seconds": result["step_seconds"],
               "mfu_per_gpu": result["mfu"] / devices,
               "first_step_loss_per_token": result["loss_per_token"],
               "first_step_seconds": result["first_step_seconds"],
               "peak_memory_bytes": result["peak_memory_bytes"], "matmul_peak_flops": peak}
        rows_out.append(row)
        _relative(rows_out, "case", "tokens_per_s", True)
        first = rows_out[0]
        row["scaling_efficiency"] = (row["tokens_per_s"] / first["tokens_per_s"]) / (
            devices / first["devices"])
        if row["global_rows"] == first["global_rows"]:  # same batch: the loss must agree
            row["loss_relative_difference"] = abs(
                row["first_step_loss_per_token"] - first["first_step_loss_per_token"]) / abs(
                first["first_step_loss_per_token"])
        record(rows_out)
        gc.collect()
        jax.clear_caches()
    return rows_out


# ----------------------------------------------------------------------------- main


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def _say(message: str) -> None:
    if _is_main():
        print(message, flush=True)


def _force_cpu_devices() -> None:
    """Eight CPU devices for ``--cpu-smoke``: must run before JAX creates its CPU backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={SMOKE_DEVICES}").strip()
    import jax

    jax.config.update("jax_platforms", "cpu")


TABLES = {
    "decode": ["mesh", "rows", "context", "decode_step_ms", "decode_tok_s", "decode_tok_s_vs_first",
               "floor_step_ms", "step_over_floor", "prefill_tok_s"],
    "rollout": ["mesh", "rows", "length", "episodes", "episodes_s", "episodes_s_vs_first",
                "gen_tok_s", "ttft_p50_s", "compile_s_in_timed"],
    "train": ["mesh", "global_rows", "tokens_per_s", "tokens_per_s_vs_first",
              "scaling_efficiency", "mfu_per_gpu", "first_step_loss_per_token",
              "loss_relative_difference"],
}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check(args, parser)
    if args.print_commands:
        print(gpu_commands())
        return 0
    if args.compare_loss:
        try:
            result = compare_loss(*args.compare_loss)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for step, a, b in zip(result["steps"], result["loss_a"], result["loss_b"]):
            print(f"step {step}: {a:.6f} {b:.6f}")
        print(f"largest relative difference {result['max_relative_difference']:.2e} "
              f"(step {result['step_of_max']})")
        return 0
    if args.cpu_smoke:
        _force_cpu_devices()
        apply_smoke(args)
    from lragent_jax import sharding

    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    from eval.common import environment, print_table, write_json
    from eval.floors import measure_ceilings

    if args.meshes is None:
        args.meshes = [(1, 4), (1, 8)] if "70b" in args.model else [(1, 1), (1, 2), (1, 4)]
    env = environment()
    env["nccl_environment"] = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
    _say(f"# {env['date']} {env['device']} x{env['device_count']} ({jax.process_count()} "
         f"process(es)), jax {env['jax']}; NCCL variables as found: "
         f"{env['nccl_environment'] or 'none'}")
    ceilings = None
    if not args.no_floors and "decode" in args.parts:
        ceilings = measure_ceilings(small=jax.default_backend() == "cpu")
        _say(f"one GPU: read {ceilings['read_Bps'] / 1e12:.2f} TB/s, bf16 matmul "
             f"{ceilings['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s")
    result = {"environment": env, "args": {k: v for k, v in vars(args).items()},
              "ceilings": ceilings, "cpu_smoke": args.cpu_smoke, "rows": {}}

    def record(part):
        def save(rows):
            result["rows"][part] = rows
            if _is_main():
                write_json(args.out, result)
                print("  " + json.dumps({k: rows[-1].get(k) for k in TABLES[part]}), flush=True)
        return save

    try:
        if "decode" in args.parts:
            run_decode(args, ceilings, record("decode"))
        if "rollout" in args.parts:
            run_rollout(args, record("rollout"))
        if "train" in args.parts:
            run_train(args, record("train"))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if _is_main():
        for part, rows in result["rows"].items():
            print_table(rows, TABLES[part], title=f"{part} on {env['device']} "
                        f"(jax {env['jax']}, {env['date']})")
        print(f"wrote {write_json(args.out, result)}")
        print("\nCommands for the GPU runs:\n" + gpu_commands())
    return 0


if __name__ == "__main__":
    sys.exit(main())
