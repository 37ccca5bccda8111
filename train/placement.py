"""Where training arrays live: one (data, model) mesh; batch rows on ``data``, base weights
optionally sharded over ``model``, adapters and optimizer state replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from lragent_jax.config import ModelConfig
from lragent_jax.sharding import DATA, make_mesh, replicate, shard_params
from train.data import Batch


class Placement:
    """Where arrays live: one (data, model) mesh; batch rows on ``data``, base weights optionally
    sharded over ``model``, adapters and optimizer state replicated."""

    def __init__(self, mesh_data: int | None = None, mesh_model: int = 1):
        devices = jax.devices()
        if mesh_data is not None:
            if mesh_data < 1 or mesh_data * mesh_model > len(devices):
                raise ValueError(f"mesh data={mesh_data} x model={mesh_model} needs "
                                 f"{mesh_data * mesh_model} devices; {len(devices)} available")
            devices = devices[:mesh_data * mesh_model]
        self.mesh = make_mesh(data=mesh_data, model=mesh_model, devices=devices)
        self.data_size = self.mesh.shape[DATA]
        self.replicated = NamedSharding(self.mesh, P())

    def params(self, params: dict, config: ModelConfig) -> dict:
        if self.mesh.shape["model"] > 1:
            return shard_params(params, config, self.mesh)
        return replicate(params, self.mesh)

    def replicate(self, tree):
        return replicate(tree, self.mesh)

    def batch(self, batch: Batch) -> dict:
        """Global arrays with rows split over the data axis (every process holds the whole host
        batch, so this works on several hosts as well)."""
        out = {}
        for name, array in batch.arrays().items():
            spec = P(DATA, *([None] * (array.ndim - 1)))
            sharding = NamedSharding(self.mesh, spec)
            out[name] = jax.make_array_from_callback(array.shape, sharding,
                                                     lambda index, a=array: a[index])
        return out

