"""One device mesh with a ``data`` axis (trajectories / samples) and a ``model`` axis (heads, MLP
width), and the NamedSharding rules for parameters, adapters, caches and batches.

Training layout (stacked ``[L, ...]`` weights, ``param_specs``): a dimension is split over an axis
only when that axis' size divides it; otherwise it is replicated, so every rule is valid for any
mesh.

Inference layout (one buffer per layer, ``inference_param_specs``): the weights are laid out with
``inference.to_inference_params(..., shards=m)`` for the model axis' size m, so that each shard's
q, k, v heads and gate, up columns are contiguous, and every projection is split over ``model``:

    qkv      [D, m, (N/m + 2·K/m)·H (+ Ra)]   P(None, model, None)   column-parallel, by heads
    qkv_bias [m, (N/m + 2·K/m)·H]             P(model, None)
    o        [N·H, D (+ Ra)]                  P(model, None)         row-parallel: one all-reduce
    gate_up  [D, m, 2·F/m (+ Ra)]             P(None, model, None)   column-parallel, by F
    down     [F, D (+ Ra)]                    P(model, None)         row-parallel: one all-reduce
    embed    [V, D], lm_head [D, V]           vocabulary over model (when m divides V)
    norms                                     replicated

so a layer costs two all-reduces of [B, T, D] over ``model`` (after o and after down) and nothing
else; the appended A columns of o and down (x·A of the row-parallel input) come out of the same
all-reduce. Weights are replicated over ``data``. The heads of q, k, v never leave their shard:
attention runs per (data, model) shard (``attention_per_shard``: a ``shard_map``, because a Pallas
call is one opaque custom call that GSPMD cannot partition, and would otherwise gather every
operand onto every device).

Prepared adapters (``inference.prepare_adapters``) are replicated: they are small (every agent's
B of a layer is [A·R, Dout] per module: 64 MB, 0.4% of the weight bytes, for Llama-3.1-8B at
R = 8, A = 3), their
output columns are in the training order (q | v side by side, not per shard), and the deltas they
produce ([B, T, Dout], R-wide products) are cheap to compute on every device and slice.

Cache (per layer, ``cache_shardings``): k, v [Rows, S, K, H] with rows over ``data`` and kv heads
over ``model``; the low-rank leaf [Rows, S, R] with rows over ``data`` and REPLICATED over
``model``. Each head shard needs all R columns of C = x·A_v (its heads' adapter term is
(P_h·C)·B_h with the full rank), so splitting R would turn every attention output into a partial
sum and add an all-reduce of [B, T, N/m, H] per layer; the replicated leaf costs R / (2·K·H/m) of
the shard's base cache instead (3.1% for Llama-3.1-8B at R = 16, m = 4) and no communication: every
shard computes the same x·A_v (its input is replicated over ``model``) and writes its own copy.
Rows are split over ``data`` only when ``data`` divides the batch: a trajectory's cache rows
(b·A + a, batch-major) then stay on one data shard, and attention and the cache writes of a shard
touch only its own rows.

Multi-host: call ``initialize_distributed`` first on every host; then ``jax.devices()`` is every
process' devices and the mesh spans them. ``fetch`` reads results that span other processes.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` for multi-host runs (no-op for a single process).

    Call it before anything touches a device. On a CPU the processes' collectives go through gloo
    (JAX's default), so the multi-process code path runs on one machine too."""
    if coordinator is None and num_processes in (None, 1):
        return
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} must be in 0..{num_processes - 1} for "
                         f"num_processes={num_processes}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over ``devices`` (default: all). ``data=None`` takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) % model:
        raise ValueError(f"model axis size {model} must divide the {len(devices)} devices")
    if data is None:
        data = len(devices) // model
    if data * model != len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices; "
                         f"{len(devices)} available")
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def _axis(mesh: Mesh, name: str, size: int) -> str | None:
    n = mesh.shape.get(name, 1)
    return name if n > 1 and size % n == 0 else None


def model_size(mesh) -> int:
    """Size of the mesh's model axis (1 without one)."""
    return int(mesh.shape.get(MODEL, 1))


# ----------------------------------------------------------------------------- training layout


def param_specs(config, mesh: Mesh) -> dict:
    """PartitionSpecs of the stacked (training-layout) parameter pytree: attention heads and MLP
    width on the model axis."""
    heads_q = _axis(mesh, MODEL, config.num_heads)
    heads_kv = _axis(mesh, MODEL, config.num_kv_heads)
    width = _axis(mesh, MODEL, config.intermediate_size)
    layers = {
        "attn_norm": P(), "mlp_norm": P(),
        "q": P(None, None, heads_q), "k": P(None, None, heads_kv), "v": P(None, None, heads_kv),
        "o": P(None, heads_q, None),
        "gate": P(None, None, width), "up": P(None, None, width), "down": P(None, width, None),
    }
    if config.qkv_bias:
        layers.update(q_bias=P(None, heads_q), k_bias=P(None, heads_kv), v_bias=P(None, heads_kv))
    specs = {"embed": P(), "final_norm": P(), "layers": layers}
    if not config.tie_embeddings:
        specs["lm_head"] = P()
    return specs


def shard_params(params: dict, config, mesh: Mesh) -> dict:
    """Stacked (training-layout) parameters placed by ``param_specs``."""
    specs = param_specs(config, mesh)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


def replicate(tree, mesh: Mesh):
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), tree)


# ----------------------------------------------------------------------------- inference layout


def _check_model_axis(config, mesh: Mesh) -> int:
    m = model_size(mesh)
    bad = [f"{name}={value}" for name, value in (
        ("num_heads", config.num_heads), ("num_kv_heads", config.num_kv_heads),
        ("intermediate_size", config.intermediate_size)) if value % m]
    if bad:
        raise ValueError(f"the mesh's model axis has size {m}, which must divide the model's "
                         f"heads and MLP width; it does not divide {', '.join(bad)} (use a model "
                         f"axis that divides num_kv_heads={config.num_kv_heads})")
    return m


def inference_param_specs(params: dict, config, mesh: Mesh) -> dict:
    """PartitionSpecs of inference-layout parameters laid out for ``mesh`` (the table in the module
    docstring); ``params`` gives the structure (and any appended A columns, which follow their
    weight's split)."""
    m = _check_model_axis(config, mesh)
    layer_m = params["layers"][0]["qkv"].shape[1]
    if layer_m != m:
        raise ValueError(f"these params are laid out for {layer_m} model shard(s); the mesh's "
                         f"model axis has {m}: use shard_inference_params, which lays them out "
                         "again")
    model = MODEL if m > 1 else None
    vocab = _axis(mesh, MODEL, config.vocab_size)
    per_layer = {"attn_norm": P(), "mlp_norm": P(), "qkv": P(None, model, None),
                 "qkv_bias": P(model, None), "o": P(model, None),
                 "gate_up": P(None, model, None), "down": P(model, None)}
    top = {"embed": P(vocab, None), "lm_head": P(None, vocab), "final_norm": P()}
    unknown = [k for k in params if k not in top and k != "layers"] + [
        k for k in params["layers"][0] if k not in per_layer]
    if unknown:
        raise ValueError(f"no sharding rule for parameter(s) {sorted(set(unknown))}")
    return {**{k: top[k] for k in params if k != "layers"},
            "layers": tuple({k: per_layer[k] for k in layer} for layer in params["layers"])}


def shard_inference_params(params: dict, config, mesh: Mesh, *, donate: bool = False) -> dict:
    """Parameters in the inference layout for ``mesh`` (``to_inference_params(..., shards=m)``),
    placed by ``inference_param_specs``.

    Stacked params are converted (``donate=True`` frees each stacked leaf once converted);
    inference-layout params laid out for another model-axis size are laid out again through the
    stacked layout (a copy, without their appended A columns: ``fuse_adapters`` puts them back).
    Params already laid out and placed for the mesh are returned as they are (placing is a no-op).
    The conversion runs where the params are: for a model that does not fit one device, build or
    load the per-layer weights directly with these shardings (``eval/bench_multi_gpu.py`` does).
    """
    from lragent_jax.inference import (is_inference_layout, to_inference_params,
                                       to_training_params)

    m = _check_model_axis(config, mesh)
    if is_inference_layout(params) and params["layers"][0]["qkv"].shape[1] != m:
        params = to_training_params(params, config)
    params = to_inference_params(params, config, shards=m, donate=donate)
    specs = inference_param_specs(params, config, mesh)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs,
                        is_leaf=lambda x: isinstance(x, P))


def shard_model(model, mesh: Mesh):
    """A ``pretrained.Model`` whose weights are laid out and placed for ``mesh`` (adapters' A
    appended again where the layout changed; adapters replicated). Sessions of the returned model
    (``model.session(..., mesh=mesh)``) share its one sharded copy of the weights."""
    from lragent_jax.inference import fuse_adapters, fused_groups

    params = shard_inference_params(model.params, model.config, mesh)
    adapters = model.adapters
    if adapters is not None:
        if not fused_groups(params, model.config):
            params = shard_inference_params(
                fuse_adapters(params, model.config, adapters, model.lora, donate=True),
                model.config, mesh)
        adapters = replicate(adapters, mesh)
    return dataclasses.replace(model, params=params, adapters=adapters)


def cache_shardings(spec, mesh: Mesh) -> dict:
    """Shardings of a cache's leaves for ``cache.init_cache`` (the module docstring says why):
    every layer's k, v [Rows, S, K, H] rows on ``data`` (when ``data`` divides the batch) and kv
    heads on ``model``; lowrank [Rows, S, R] rows on ``data``, replicated over ``model``;
    processed [B, A] and filled [B] rows on ``data``."""
    rows = _axis(mesh, DATA, spec.batch)
    heads = _axis(mesh, MODEL, spec.kv_heads)
    out = {"k": NamedSharding(mesh, P(rows, None, heads, None)),
           "v": NamedSharding(mesh, P(rows, None, heads, None)),
           "processed": NamedSharding(mesh, P(rows, None)),
           "filled": NamedSharding(mesh, P(rows))}
    if spec.rank:
        out["lowrank"] = NamedSharding(mesh, P(rows, None, None))
    return out


# ----------------------------------------------------------------------------- in the jitted turn


def _context_axes(batch: int, heads: tuple[int, ...]):
    """(mesh, data axis or None, model axis or None) of the mesh set by ``jax.set_mesh`` around the
    traced call (what ``Session(mesh=...)`` does): data when it divides ``batch``, model when it
    divides every count in ``heads``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return mesh, None, None
    shape = dict(mesh.shape)
    data = DATA if shape.get(DATA, 1) > 1 and batch % shape[DATA] == 0 else None
    model = (MODEL if shape.get(MODEL, 1) > 1 and all(h % shape[MODEL] == 0 for h in heads)
             else None)
    return mesh, data, model


def constrain_rows(x):
    """``x`` [B, ...] with its rows on the context mesh's data axis (when there is one that divides
    B), so that GSPMD splits the layers' activations by trajectory rather than replicating them."""
    mesh, data, _ = _context_axes(x.shape[0], ())
    if data is None:
        return x
    spec = P(data, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def constrain_shards(x, axis: int):
    """``x`` [B, ..., m, ...] (a column-parallel projection's output in the ``shards`` layout, the
    shard axis at ``axis``) with its rows on the context mesh's data axis and that axis on model:
    each device keeps its own heads' (or F columns') outputs, with no resharding before they are
    sliced into q, k, v (or gate, up)."""
    mesh, data, model = _context_axes(x.shape[0], (x.shape[axis],))
    if model is None or x.shape[axis] != mesh.shape[MODEL]:
        return constrain_rows(x)
    spec = [data] + [None] * (x.ndim - 1)
    spec[axis] = model
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def attention_per_shard(body, q, k, v, lowrank, lora_b, adapter_index, cache, plan):
    """Run ``body(q, k, v, lowrank, lora_b, adapter_index, cache, plan) -> (out, cache)`` (one
    layer's cache write and Flash-LoRA attention, ``inference._write_and_attend``) once per
    (data, model) shard of the mesh set around the traced call, or as it is without one.

    Shapes: q [B, T, N, H]; k, v [B, T, K, H] (the chunk's new entries); lowrank [B, T, R] or None;
    lora_b [A, K, R, H] or None; adapter_index [B] or [B, T] or None; cache a ``LayerCache``
    (k, v [Rows, S, K, H], lowrank [Rows, S, R] or None) or None; plan a ``ChunkPlan``. Each shard
    gets its rows (when ``data`` divides B) and its N/m query heads, K/m kv heads and their
    lora_b, the whole rank of lowrank, and returns its part of out [B, T, N, H] and of the cache.
    Cache rows are batch-major (``cache.cache_rows``: row b's rows lie in b's data shard), so the
    plan's global row indices become shard-local by subtracting the shard's first row.
    """
    from lragent_jax.cache import LayerCache

    mesh, data, model = _context_axes(q.shape[0], (q.shape[2], k.shape[2]))
    if data is None and model is None:
        return body(q, k, v, lowrank, lora_b, adapter_index, cache, plan)
    heads = P(data, None, model, None)
    rows = P(data, None, None)
    by_row = lambda x: None if x is None else P(data, *([None] * (x.ndim - 1)))  # noqa: E731
    cache_specs = None if cache is None else LayerCache(
        heads, heads, None if cache.lowrank is None else rows)
    plan_specs = dataclasses.replace(plan, **{f.name: by_row(getattr(plan, f.name))
                                              for f in dataclasses.fields(plan)})
    args = (q, k, v, lowrank, lora_b, adapter_index, cache, plan)
    specs = (heads, heads, heads, None if lowrank is None else rows,
             None if lora_b is None else P(None, model, None, None), by_row(adapter_index),
             cache_specs, plan_specs)
    leaves, treedef = jax.tree.flatten(args)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert len(leaves) == len(spec_leaves), (len(leaves), len(spec_leaves))
    cache_out = [] if cache is None else jax.tree.leaves(cache_specs,
                                                         is_leaf=lambda x: isinstance(x, P))

    def shard(*local):
        q, k, v, lowrank, lora_b, adapter_index, cache, plan = jax.tree.unflatten(treedef, local)
        if data is not None and cache is not None:
            first = jax.lax.axis_index(data)
            kv_row, lowrank_row = plan.kv_row, plan.lowrank_row
            plan = dataclasses.replace(
                plan, kv_row=None if kv_row is None else kv_row - first * cache.k.shape[0],
                lowrank_row=None if lowrank_row is None
                else lowrank_row - first * cache.lowrank.shape[0])
        out, cache = body(q, k, v, lowrank, lora_b, adapter_index, cache, plan)
        return (out, *jax.tree.leaves(cache))

    results = jax.shard_map(shard, mesh=mesh, in_specs=tuple(spec_leaves),
                            out_specs=(heads, *cache_out), check_vma=False)(*leaves)
    out, cache_leaves = results[0], results[1:]
    if cache is None:
        return out, None
    return out, jax.tree.unflatten(jax.tree.structure(cache), cache_leaves)


# ----------------------------------------------------------------------------- results on the host


def fetch(tree):
    """``jax.device_get`` that also reads arrays spanning other processes' devices (multi-host: a
    session's outputs are split over the data axis, which spans hosts); every process gets the
    whole value."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False)
           for x in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                        if isinstance(x, jax.Array) else x, tree)
