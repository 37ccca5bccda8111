"""The model's leaf table is the one description of the parameter tree: its shapes, HF and GGUF
names, and model-axis splits agree with what the model, the loaders and the sharding rules use."""

from __future__ import annotations

import types

import jax
import pytest

from lragent_jax.config import ModelConfig
from lragent_jax.loading.gguf import gguf_to_hf_name, hf_to_gguf_name
from lragent_jax.loading.hf import hf_plan
from lragent_jax.model import PARAM_LEAVES, init_params, param_leaves, param_shapes
from lragent_jax.sharding import param_specs

CONFIGS = {
    "tied": ModelConfig.tiny(num_heads=4, num_kv_heads=2),
    "untied_qkv_bias": ModelConfig.tiny(num_heads=6, num_kv_heads=2, qkv_bias=True,
                                        tie_embeddings=False),
}


def _strip(spec) -> tuple:
    """A PartitionSpec without trailing Nones (P() and P(None, None) both replicate)."""
    axes = list(spec)
    while axes and axes[-1] is None:
        axes.pop()
    return tuple(axes)


def _spec_from_table(leaf, config, model_size: int) -> tuple:
    axes = [None] * len(leaf.shape(config))
    if (leaf.model_axis is not None and model_size > 1
            and getattr(config, leaf.model_split) % model_size == 0):
        axes[leaf.model_axis] = "model"
    return _strip(axes)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("model_size", [1, 2, 3, 4])
def test_model_axis_fields_give_the_sharding_rules(name, model_size):
    config = CONFIGS[name]
    mesh = types.SimpleNamespace(shape={"data": 1, "model": model_size})  # the rules read sizes
    specs = param_specs(config, mesh)
    for leaf in param_leaves(config):
        rule = specs["layers"][leaf.name] if leaf.per_layer else specs[leaf.name]
        assert _strip(rule) == _spec_from_table(leaf, config, model_size), leaf.name
    assert sum(len(v) if k == "layers" else 1 for k, v in specs.items()) == \
        len(param_leaves(config))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shapes_names_and_init_follow_the_table(name):
    config = CONFIGS[name]
    shapes = param_shapes(config)
    params = init_params(jax.random.key(0), config)
    assert jax.tree.map(lambda x: tuple(x.shape), params) == shapes
    present = {leaf.name for leaf in param_leaves(config)}
    assert ("lm_head" in present) == (not config.tie_embeddings)
    assert ("q_bias" in present) == config.qkv_bias
    keys = [key for key, _, _ in hf_plan(config)]
    assert len(keys) == len(set(keys))
    per_layer = sum(leaf.per_layer for leaf in param_leaves(config))
    assert len(keys) == len(present) - per_layer + per_layer * config.num_layers
    for key in keys:  # GGUF names map back to the same HF keys
        assert gguf_to_hf_name(hf_to_gguf_name(key)) == key
    for leaf in param_leaves(config):  # norms are drawn around 1, biases around 0
        value = params["layers"][leaf.name] if leaf.per_layer else params[leaf.name]
        if leaf.kind == "norm":
            assert abs(float(value.mean()) - 1.0) < 0.2, leaf.name
        elif leaf.kind == "bias":
            assert abs(float(value.mean())) < 0.2 and float(value.std()) > 0.0, leaf.name


def test_every_leaf_is_described_once():
    names = [leaf.name for leaf in PARAM_LEAVES]
    assert len(names) == len(set(names))
    for leaf in PARAM_LEAVES:
        assert leaf.kind in ("embedding", "norm", "bias", "matrix")
        assert leaf.present in (None, "untied", "qkv_bias")
        assert (leaf.model_axis is None) == (leaf.model_split is None)
        assert ("{layer}" in leaf.hf_key) == leaf.per_layer == ("{layer}" in leaf.gguf_name)
        assert leaf.rope_heads in (None, "num_heads", "num_kv_heads")
