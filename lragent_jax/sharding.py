"""One device mesh with a ``data`` axis (trajectories / samples) and a ``model`` axis (heads, MLP
width), and the NamedSharding rules for parameters, adapters, caches and batches.

A dimension is split over an axis only when that axis' size divides it; otherwise it is replicated,
so every rule is valid for any mesh. Multi-host: call ``initialize_distributed`` first on every host.
"""

from __future__ import annotations

import numpy as np

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` for multi-host runs (no-op for a single process)."""
    if coordinator is None and num_processes in (None, 1):
        return
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
    n = mesh.shape[name]
    return name if n > 1 and size % n == 0 else None


def param_specs(config, mesh: Mesh) -> dict:
    """PartitionSpecs of the parameter pytree: attention heads and MLP width on the model axis."""
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
    specs = param_specs(config, mesh)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


def replicate(tree, mesh: Mesh):
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), tree)


def cache_shardings(spec, mesh: Mesh) -> dict:
    """Shardings of a cache's leaves: rows on the data axis, kv heads on the model axis."""
    rows_b = _axis(mesh, DATA, spec.base_rows)
    heads = _axis(mesh, MODEL, spec.kv_heads)
    batch = _axis(mesh, DATA, spec.batch)
    out = {"k": NamedSharding(mesh, P(None, rows_b, None, heads, None)),
           "v": NamedSharding(mesh, P(None, rows_b, None, heads, None)),
           "processed": NamedSharding(mesh, P(batch, None)),
           "filled": NamedSharding(mesh, P(batch))}
    if spec.rank:
        rows_l = _axis(mesh, DATA, spec.lowrank_rows)
        out["lowrank"] = NamedSharding(mesh, P(None, rows_l, None, None))
    return out


def batch_sharding(mesh: Mesh, batch: int, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis on the data axis."""
    return NamedSharding(mesh, P(_axis(mesh, DATA, batch), *([None] * (ndim - 1))))
