"""Shared-A multi-agent LoRA adapters.

Adapter pytree, one entry per target module (see ``LoraConfig``):

    adapters[module] = {"a": [L, Din, R]      (shared_a)   or [L, A, Din, R]   (one A per agent),
                        "b": [L, A, R, Dout]}

B holds the scale alpha / rank folded in, so the adapter output of agent i is (x @ A) @ B[i].
A batch row carries an agent index; ``NO_ADAPTER`` (-1) runs the bare base model for that row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lragent_jax.config import ADAPTER_TARGETS, LoraConfig, ModelConfig

NO_ADAPTER = -1


def cache_view(agent):
    """The agent view a row reads and writes in the cache: the agent's own, and agent 0's for
    ``NO_ADAPTER`` (the bare model keeps no view of its own; its rows add no adapter term).
    The one place that maps -1 to a view; works on ints and on jax arrays."""
    if isinstance(agent, (int, np.integer)):
        return max(int(agent), 0)
    return jnp.maximum(agent, 0)


def adapter_shapes(config: ModelConfig, lora: LoraConfig) -> dict:
    """Shapes of every adapter leaf, as the pytree ``init_adapters`` returns."""
    shapes = {}
    for module in lora.targets:
        d_in, d_out = config.module_dims(module)
        a_shape = ((config.num_layers, d_in, lora.rank) if lora.shared_a
                   else (config.num_layers, lora.num_agents, d_in, lora.rank))
        shapes[module] = {"a": a_shape,
                          "b": (config.num_layers, lora.num_agents, lora.rank, d_out)}
    return shapes


def init_adapters(key, config: ModelConfig, lora: LoraConfig, *, dtype=jnp.float32,
                  b_scale: float = 0.0) -> dict:
    """Fresh adapters: A ~ N(0, 1/Din) (Kaiming-like), B = 0 (or ~N(0, b_scale^2) for tests).

    With B = 0 every agent starts as the bare base model, as in standard LoRA training.
    """
    return _init_adapters(key, config, lora, jnp.dtype(dtype), float(b_scale))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_adapters(key, config, lora, dtype, b_scale) -> dict:
    # one compiled program instead of one eager compilation per leaf shape
    shapes = adapter_shapes(config, lora)
    out = {}
    keys = jax.random.split(key, 2 * len(shapes))
    for i, (module, leaf_shapes) in enumerate(shapes.items()):
        d_in = config.module_dims(module)[0]
        a = jax.random.normal(keys[2 * i], leaf_shapes["a"], jnp.float32) / np.sqrt(d_in)
        if b_scale:
            b = jax.random.normal(keys[2 * i + 1], leaf_shapes["b"], jnp.float32) * b_scale
        else:
            b = jnp.zeros(leaf_shapes["b"], jnp.float32)
        out[module] = {"a": a.astype(dtype), "b": b.astype(dtype)}
    return out


def count_parameters(adapters: dict) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters)))


def expected_parameter_count(config: ModelConfig, lora: LoraConfig) -> int:
    """|A| + N·|B| for shared A; N·(|A| + |B|) for one A per agent."""
    total = 0
    for module in lora.targets:
        d_in, d_out = config.module_dims(module)
        per_a = config.num_layers * d_in * lora.rank
        per_b = config.num_layers * lora.rank * d_out
        total += (per_a if lora.shared_a else lora.num_agents * per_a) + lora.num_agents * per_b
    return total


def validate_adapters(adapters: dict, config: ModelConfig, lora: LoraConfig) -> None:
    """Raise with every mismatch between an adapter pytree and its configs."""
    problems = []
    expected = adapter_shapes(config, lora)
    extra = sorted(set(adapters) - set(expected))
    if extra:
        problems.append(f"adapters for modules {extra} not in targets {list(lora.targets)} "
                        f"(allowed targets: {ADAPTER_TARGETS})")
    for module, leaf_shapes in expected.items():
        if module not in adapters:
            problems.append(f"missing adapter for target {module!r}")
            continue
        for leaf, shape in leaf_shapes.items():
            got = getattr(adapters[module].get(leaf), "shape", None)
            if got != shape:
                problems.append(f"adapters[{module!r}][{leaf!r}] has shape {got}, expected {shape}")
    if problems:
        raise ValueError("adapters do not match the model/LoRA config:\n  " + "\n  ".join(problems))


def shares_a(adapters: dict, lora: LoraConfig, *, atol: float = 0.0) -> bool:
    """True if every agent uses the same A (checked on the values, not trusted from the config)."""
    if lora.shared_a:
        return True
    for module in adapters:
        a = np.asarray(adapters[module]["a"], np.float32)  # [L, A, Din, R]
        if np.max(np.abs(a - a[:, :1])) > atol:
            return False
    return True


def _agent_rows(x, adapter_index):
    """Gather x[adapter_index] along axis 0, zeroing rows whose index is NO_ADAPTER."""
    safe = jnp.clip(adapter_index, 0, x.shape[0] - 1)
    rows = jnp.take(x, safe, axis=0)
    keep = (adapter_index >= 0).astype(rows.dtype)
    return rows * keep.reshape(keep.shape + (1,) * (rows.ndim - keep.ndim))


def _select_agent(per_agent, adapter_index):
    """per_agent [B, T, A, O] -> [B, T, O] picking each token's agent (zero for NO_ADAPTER).

    A one-hot product rather than a gather: its gradient is elementwise, where a gather's is a
    scatter-add (slow on GPUs)."""
    onehot = jax.nn.one_hot(adapter_index, per_agent.shape[2], dtype=per_agent.dtype)
    return jnp.einsum("btao,bta->bto", per_agent, onehot)


def project_lowrank(x, a, adapter_index):
    """x @ A: x [B, T, Din]; a [Din, R] (shared) or [A, Din, R]. Returns [B, T, R].

    ``adapter_index`` is [B] (one agent per row) or [B, T] (one agent per token).
    """
    if a.ndim == 2:
        return jnp.einsum("btd,dr->btr", x, a.astype(x.dtype))
    if adapter_index.ndim == 2:
        return _select_agent(jnp.einsum("btd,adr->btar", x, a.astype(x.dtype)), adapter_index)
    safe = jnp.clip(adapter_index, 0, a.shape[0] - 1)
    return jnp.einsum("btd,bdr->btr", x, jnp.take(a, safe, axis=0).astype(x.dtype))


def expand_lowrank(lowrank, b, adapter_index):
    """(x @ A) @ B[agent]: lowrank [B, T, R]; b [A, R, Dout]; ``adapter_index`` [B] or [B, T].
    Returns [B, T, Dout]."""
    if adapter_index.ndim == 2:
        return _select_agent(jnp.einsum("btr,aro->btao", lowrank, b.astype(lowrank.dtype)),
                             adapter_index)
    return jnp.einsum("btr,bro->bto", lowrank, _agent_rows(b, adapter_index).astype(lowrank.dtype))


def lora_delta(x, layer_adapter: dict, adapter_index):
    """Adapter output of one module for a batch whose rows use different agents."""
    lowrank = project_lowrank(x, layer_adapter["a"], adapter_index)
    return expand_lowrank(lowrank, layer_adapter["b"], adapter_index)


def merge_adapter(params: dict, adapters: dict, agent: int) -> dict:
    """Base params with agent ``agent``'s adapter folded into the weights (W + A @ B[agent])."""
    layers = dict(params["layers"])
    for module, leaves in adapters.items():
        a = leaves["a"] if leaves["a"].ndim == 3 else leaves["a"][:, agent]
        delta = jnp.einsum("ldr,lro->ldo", a.astype(jnp.float32),
                           leaves["b"][:, agent].astype(jnp.float32))
        layers[module] = (layers[module].astype(jnp.float32) + delta).astype(layers[module].dtype)
    return {**params, "layers": layers}
