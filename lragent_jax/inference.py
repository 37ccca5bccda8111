"""The inference layout: one buffer per layer, fused projections, prepared adapters, and the
per-layer forward that reads and writes the multi-agent cache.

Why a second layout (DESIGN.md): decoding reads every weight once per token. Under ``lax.scan``
over layer-stacked ``[L, ...]`` weights inside the decode ``while_loop``, XLA materialises each
layer's slice, so every weight byte is read twice and written once. Here every layer's weights
are their own arrays and the layers run as a Python loop inside the jitted turn: each byte is read
once. Training keeps the stacked layout (``model.forward_hidden``): a whole-sequence step amortises
the slices and its compile time does not grow with depth.

Per-layer weights (``params["layers"]`` is a tuple of L dicts; m = model-parallel shards, 1 unless
the weights are laid out for a mesh, so that each shard's columns are contiguous):

    attn_norm [D], mlp_norm [D]
    qkv      [D, m, (N/m + 2·K/m)·H (+ Ra)]   shard j: its q heads | its k heads | its v heads
    qkv_bias [m, (N/m + 2·K/m)·H]             (Qwen2 only)
    o        [N·H, D (+ Ra)]
    gate_up  [D, m, 2·F/m (+ Ra)]             shard j: its gate columns | its up columns
    down     [F, D (+ Ra)]

q|k|v and gate|up are each one matmul: one weight read and one kernel instead of three or two.
With adapters attached (``fuse_adapters``), each group's A matrices are appended as Ra extra
columns (for q|k|v and gate|up only when m = 1), so x·A comes out of the base matmul at no extra
kernel; the bare model ignores those columns.

On a mesh (the one ``jax.set_mesh`` sets around the traced call, as ``Session(mesh=...)`` does),
the weights split by ``sharding.inference_param_specs``, each layer's cache write and attention
run once per (data, model) shard (``sharding.attention_per_shard``), and the activations are kept
split by rows and by shard; without one, nothing changes.

Prepared adapters (``prepare_adapters``, per layer, built once per session from the stacked
adapter pytree): for each projection group ("qkv", "o", "gate_up", "down") with adapted modules,
``a`` [Din, Σ Rm] (the group's A matrices side by side; Rm = R with shared A, A·R with one A per
agent; absent where the weights carry them) and ``b`` [Mb·A·R, Σ Dout] (every agent's B of the Mb modules whose delta is added, in one
block matrix). A row's delta is then one product of its agent-masked low-rank activations with
``b``: one matmul per group over all agents, no gather, any per-row or per-token agent mix. With a
factored v (base_shared, base_lowrank_shared) v's delta is not added: its x·A goes to the low-rank
cache and ``v_b`` [A, K, R, H] is applied inside attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lragent_jax.cache import CacheArrays, ChunkPlan, write_layer
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.lora import cache_view
from lragent_jax.model import F32, apply_rope, rms_norm, rope_inv_freq
from lragent_jax.sharding import attention_per_shard, constrain_rows, constrain_shards
from pallas_kernels.flash_lora_attention import flash_lora_attention

GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


# ----------------------------------------------------------------------------- the weight layout


def is_inference_layout(params: dict) -> bool:
    return isinstance(params.get("layers"), (tuple, list))


def _check_shards(config: ModelConfig, shards: int) -> None:
    if (not isinstance(shards, int) or shards < 1 or config.num_heads % shards
            or config.num_kv_heads % shards or config.intermediate_size % shards):
        raise ValueError(f"shards={shards!r} must be a positive int dividing num_heads="
                         f"{config.num_heads}, num_kv_heads={config.num_kv_heads} and "
                         f"intermediate_size={config.intermediate_size}")


def _fuse_qkv(q, k, v, m: int, head_dim: int):
    """[D, N·H], [D, K·H], [D, K·H] (or biases without the D axis) -> [..., m, (N/m+2K/m)·H]."""
    lead = q.shape[:-1]
    parts = [x.reshape(*lead, m, x.shape[-1] // m) for x in (q, k, v)]
    return jnp.concatenate(parts, axis=-1)


def _fuse_gate_up(gate, up, m: int):
    d = gate.shape[0]
    return jnp.concatenate([gate.reshape(d, m, -1), up.reshape(d, m, -1)], axis=-1)


# One small program per leaf shape, called once per layer with the layer index as an argument
# (a program returning all L slices at once takes seconds to compile on a CPU).
@functools.partial(jax.jit, static_argnames=("m", "head_dim"))
def _layer_qkv(q, k, v, index, *, m, head_dim):
    take = functools.partial(jax.lax.dynamic_index_in_dim, index=index, keepdims=False)
    return _fuse_qkv(take(q), take(k), take(v), m, head_dim)


@functools.partial(jax.jit, static_argnames=("m",))
def _layer_gate_up(gate, up, index, *, m):
    take = functools.partial(jax.lax.dynamic_index_in_dim, index=index, keepdims=False)
    return _fuse_gate_up(take(gate), take(up), m)


@jax.jit
def _layer_slice(x, index):
    return jax.lax.dynamic_index_in_dim(x, index, keepdims=False)


def _split_qkv(q, k, v, *, m, head_dim, layers):
    return tuple(_layer_qkv(q, k, v, jnp.int32(i), m=m, head_dim=head_dim)
                 for i in range(layers))


def _split_gate_up(gate, up, *, m, layers):
    return tuple(_layer_gate_up(gate, up, jnp.int32(i), m=m) for i in range(layers))


def _split(x, *, layers):
    return tuple(_layer_slice(x, jnp.int32(i)) for i in range(layers))


def to_inference_params(params: dict, config: ModelConfig, *, shards: int = 1,
                        donate: bool = False) -> dict:
    """The per-layer inference layout of stacked (training-layout) parameters.

    Converts one group of leaves at a time; with ``donate=True`` each stacked leaf is deleted as
    soon as its per-layer copies exist, so at most one group (q|k|v or gate|up) is held twice.
    Parameters already in the inference layout are returned as they are.
    """
    if is_inference_layout(params):
        return params
    _check_shards(config, shards)
    stacked = params["layers"]
    L, m, H = config.num_layers, shards, config.head_dim
    layers = [dict() for _ in range(L)]

    def done(*names):
        if donate:
            for name in names:
                stacked[name].delete()

    for name in ("attn_norm", "mlp_norm", "o", "down"):
        for i, x in enumerate(_split(stacked[name], layers=L)):
            layers[i][name] = x
        done(name)
    for i, x in enumerate(_split_qkv(stacked["q"], stacked["k"], stacked["v"], m=m, head_dim=H,
                                     layers=L)):
        layers[i]["qkv"] = x
    done("q", "k", "v")
    if config.qkv_bias:
        for i, x in enumerate(_split_qkv(stacked["q_bias"], stacked["k_bias"], stacked["v_bias"],
                                         m=m, head_dim=H, layers=L)):
            layers[i]["qkv_bias"] = x
        done("q_bias", "k_bias", "v_bias")
    for i, x in enumerate(_split_gate_up(stacked["gate"], stacked["up"], m=m, layers=L)):
        layers[i]["gate_up"] = x
    done("gate", "up")
    return {**{k: v for k, v in params.items() if k != "layers"}, "layers": tuple(layers)}


def to_training_params(params: dict, config: ModelConfig) -> dict:
    """The stacked layout of inference-layout parameters (a copy; the inverse of
    ``to_inference_params``)."""
    if not is_inference_layout(params):
        return params
    N, K, H, F = config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size
    layers = params["layers"]
    m = layers[0]["qkv"].shape[1]
    nq, nk = N // m * H, K // m * H

    def unfuse(fused, lead):
        x = fused.reshape(*lead, m, nq + 2 * nk)
        return (x[..., :nq].reshape(*lead, N * H), x[..., nq:nq + nk].reshape(*lead, K * H),
                x[..., nq + nk:].reshape(*lead, K * H))

    out = {name: [] for name in ("attn_norm", "mlp_norm", "q", "k", "v", "o", "gate", "up",
                                 "down")}
    if config.qkv_bias:
        out.update(q_bias=[], k_bias=[], v_bias=[])
    for lp in unfuse_adapters(params, config)["layers"]:
        d = lp["qkv"].shape[0]
        for name in ("attn_norm", "mlp_norm", "o", "down"):
            out[name].append(lp[name])
        for name, x in zip("qkv", unfuse(lp["qkv"], (d,))):
            out[name].append(x)
        if config.qkv_bias:
            for name, x in zip(("q_bias", "k_bias", "v_bias"), unfuse(lp["qkv_bias"], ())):
                out[name].append(x)
        gu = lp["gate_up"][..., :2 * (F // m)]
        out["gate"].append(gu[..., :F // m].reshape(d, F))
        out["up"].append(gu[..., F // m:].reshape(d, F))
    stacked = {name: jnp.stack(xs) for name, xs in out.items()}
    return {**{k: v for k, v in params.items() if k != "layers"}, "layers": stacked}


def base_widths(config: ModelConfig, m: int) -> dict:
    """Output columns of each group's base weight (without appended A columns)."""
    N, K, H, F, D = (config.num_heads, config.num_kv_heads, config.head_dim,
                     config.intermediate_size, config.hidden_size)
    return {"qkv": (N // m + 2 * (K // m)) * H, "o": D, "gate_up": 2 * (F // m), "down": D}


def _shards(layer: dict) -> int:
    return layer["qkv"].shape[1]


def fused_groups(params: dict, config: ModelConfig) -> frozenset:
    """Groups whose weights carry appended A columns (from the shapes)."""
    if not is_inference_layout(params):
        return frozenset()
    layer = params["layers"][0]
    widths = base_widths(config, _shards(layer))
    return frozenset(g for g in GROUPS if layer[g].shape[-1] > widths[g])


def _concat_a(layer_a: dict, lora: LoraConfig, group: str):
    """One layer's A matrices of a group side by side [Din, Σ Rm] (None: no adapted module);
    ``layer_a``: module -> [Din, R] (shared A) or [A, Din, R]."""
    parts = []
    for module in GROUPS[group]:
        if module not in lora.targets:
            continue
        a = layer_a[module]
        if a.ndim == 3:
            a = jnp.transpose(a, (1, 0, 2)).reshape(a.shape[1], -1)
        parts.append(a)
    return jnp.concatenate(parts, axis=-1) if parts else None


def _group_a(adapters: dict, lora: LoraConfig, group: str, layer: int):
    return _concat_a({m: adapters[m]["a"][layer] for m in GROUPS[group] if m in lora.targets},
                     lora, group)


@functools.partial(jax.jit, static_argnames=("config", "lora"))
def _fuse_layer(layer, stacked_a, index, *, config, lora):
    widths = base_widths(config, _shards(layer))
    layer_a = {m: jax.lax.dynamic_index_in_dim(a, index, keepdims=False)
               for m, a in stacked_a.items()}
    out = {}
    for group in GROUPS:
        w = layer[group][..., :widths[group]]
        a_cat = _concat_a(layer_a, lora, group)
        if a_cat is None or (w.ndim == 3 and w.shape[1] > 1):
            out[group] = w
            continue
        a_cat = a_cat.astype(w.dtype)
        out[group] = jnp.concatenate([w, a_cat[:, None, :] if w.ndim == 3 else a_cat], axis=-1)
    return out


def fuse_adapters(params: dict, config: ModelConfig, adapters: dict | None,
                  lora: LoraConfig | None, *, donate: bool = False) -> dict:
    """Inference-layout params with the adapters' A matrices appended to each group's weight
    (replacing any A appended before); the bare weights when ``adapters`` is None. One layer at a
    time; with ``donate=True`` each old layer buffer is deleted once its new one exists."""
    if not is_inference_layout(params):
        raise ValueError("fuse_adapters takes inference-layout params (to_inference_params)")
    if adapters is None:
        return unfuse_adapters(params, config, donate=donate)
    layers = []
    for i, layer in enumerate(params["layers"]):
        groups = {g: layer[g] for g in GROUPS}
        fused = _fuse_layer(groups, {m: adapters[m]["a"] for m in lora.targets}, jnp.int32(i),
                            config=config, lora=lora)
        layers.append({**layer, **fused})
        if donate:
            for group in GROUPS:
                layer[group].delete()
    return {**params, "layers": tuple(layers)}


def unfuse_adapters(params: dict, config: ModelConfig, *, donate: bool = False) -> dict:
    """Inference-layout params without appended A columns."""
    if not fused_groups(params, config):
        return params
    layers = []
    for layer in params["layers"]:
        widths = base_widths(config, _shards(layer))
        new = dict(layer)
        for group in GROUPS:
            if layer[group].shape[-1] > widths[group]:
                new[group] = layer[group][..., :widths[group]]
                if donate:
                    layer[group].delete()
        layers.append(new)
    return {**params, "layers": tuple(layers)}


@functools.partial(jax.jit, static_argnames=("config", "lora", "groups"))
def _appended_match(layer, stacked_a, index, *, config, lora, groups):
    """Per fused group of one layer: whether its appended columns equal the adapters' A."""
    widths = base_widths(config, _shards(layer))
    layer_a = {m: jax.lax.dynamic_index_in_dim(a, index, keepdims=False)
               for m, a in stacked_a.items()}
    out = {}
    for group in groups:
        got = layer[group][..., widths[group]:]
        got = got[..., 0, :] if got.ndim == 3 else got
        want = _concat_a(layer_a, lora, group)
        out[group] = (jnp.array(False) if want is None or got.shape != want.shape else
                      jnp.allclose(got.astype(F32), want.astype(got.dtype).astype(F32)))
    return out


def check_fused_adapters(params: dict, config: ModelConfig, adapters: dict | None,
                         lora: LoraConfig | None) -> None:
    """Refuse params whose appended A columns are not these adapters' A (first and last layer)."""
    groups = fused_groups(params, config)
    if not groups or adapters is None:
        return
    stacked_a = {m: adapters[m]["a"] for m in lora.targets}
    for index in sorted({0, config.num_layers - 1}):
        layer = params["layers"][index]
        match = jax.device_get(_appended_match(
            {g: layer[g] for g in GROUPS}, stacked_a, jnp.int32(index), config=config, lora=lora,
            groups=tuple(sorted(groups))))
        bad = sorted(g for g, ok in match.items() if not ok)
        if bad:
            raise ValueError(
                f"these params carry the A matrices of other adapters (group {bad[0]!r}, "
                f"layer {index}): use inference.fuse_adapters(params, config, adapters, lora) "
                "or the Model these adapters were attached to")


# ----------------------------------------------------------------------------- prepared adapters


def _group_modules(lora: LoraConfig, group: str, factored_v: bool):
    """(modules whose A the group computes, modules whose delta the group adds)."""
    with_a = tuple(m for m in GROUPS[group] if m in lora.targets)
    with_b = tuple(m for m in with_a if not (factored_v and m == "v"))
    return with_a, with_b


def prepare_adapters(adapters: dict | None, config: ModelConfig, lora: LoraConfig | None, *,
                     factored_v: bool, dtype=None, fused: frozenset = frozenset()
                     ) -> tuple | None:
    """Per-layer prepared adapters (see the module docstring) from the stacked adapter pytree
    ``{module: {"a": [L, Din, R] or [L, A, Din, R], "b": [L, A, R, Dout]}}``; no ``a`` for the
    ``fused`` groups, whose weights carry it. Traceable."""
    if adapters is None or lora is None:
        return None
    A, R = lora.num_agents, lora.rank
    out = []
    for layer in range(config.num_layers):
        prepared = {}
        for group in GROUPS:
            with_a, with_b = _group_modules(lora, group, factored_v)
            if not with_a:
                continue
            entry = {} if group in fused else {"a": _group_a(adapters, lora, group, layer)}
            if with_b:
                widths = [config.module_dims(mod)[1] for mod in with_b]
                rows = []
                for i, module in enumerate(with_b):
                    b = adapters[module]["b"][layer].reshape(A * R, widths[i])
                    row = [b if j == i else jnp.zeros((A * R, w), b.dtype)
                           for j, w in enumerate(widths)]
                    rows.append(jnp.concatenate(row, axis=-1))
                entry["b"] = jnp.concatenate(rows, axis=0)  # [Mb·A·R, Σ Dout]
            prepared[group] = entry
        if factored_v and "v" in lora.targets:
            b = adapters["v"]["b"][layer]  # [A, R, K·H]
            prepared["v_b"] = b.reshape(A, R, config.num_kv_heads, config.head_dim).transpose(
                0, 2, 1, 3)
        if dtype is not None:
            prepared = jax.tree.map(lambda x: x.astype(dtype), prepared)
        out.append(prepared)
    return tuple(out)


def agent_onehot(adapter_index: Int[Array, "B"] | Int[Array, "B T"], num_agents: int, dtype
                 ) -> Float[Array, "B Tq A"]:
    """[B, 1, A] (one agent per row) or [B, T, A] (one per token); all zeros for index -1."""
    index = adapter_index if adapter_index.ndim == 2 else adapter_index[:, None]
    return jax.nn.one_hot(index, num_agents, dtype=dtype)


def _masked_lowrank(xa: Float[Array, "B T Rm"], onehot: Float[Array, "B Tq A"], lora: LoraConfig):
    """[B, T, A·R]: the row's agent block holds its x·A, every other block zeros."""
    B, T = xa.shape[:2]
    A, R = lora.num_agents, lora.rank
    if lora.shared_a:
        per_agent = xa[:, :, None, :] * onehot[..., None]
    else:
        per_agent = xa.reshape(B, T, A, R) * onehot[..., None]
    return per_agent.reshape(B, T, A * R)


def _group_adapter(h, xa, entry, lora: LoraConfig, group: str, factored_v: bool, onehot, config):
    """(x·A of each module in the group [B, T, Rm], delta of each module with a B [B, T, Dout]).
    ``xa``: the group's x·A from the fused base matmul, or None to compute it from ``entry``."""
    with_a, with_b = _group_modules(lora, group, factored_v)
    if xa is None:
        xa = jnp.einsum("btd,dr->btr", h, entry["a"].astype(h.dtype))
    per = lora.rank if lora.shared_a else lora.rank * lora.num_agents
    pieces = {m: xa[..., i * per:(i + 1) * per] for i, m in enumerate(with_a)}
    deltas = {}
    if with_b:
        masked = jnp.concatenate([_masked_lowrank(pieces[m], onehot, lora) for m in with_b],
                                 axis=-1)
        # replicated over the model axis: its columns are q | v side by side (not per shard), so
        # a split of them would not line up with the heads they are added to
        delta = constrain_rows(jnp.einsum("btr,ro->bto", masked, entry["b"].astype(h.dtype),
                                          preferred_element_type=F32))
        offset = 0
        for m in with_b:
            width = config.module_dims(m)[1]
            deltas[m] = constrain_rows(delta[..., offset:offset + width])
            offset += width
    return pieces, deltas


def _select_lowrank(xa_v, onehot_clipped, lora: LoraConfig):
    """The row's own x·A_v [B, T, R] from a module's low-rank piece (all agents' with one A per
    agent)."""
    if lora.shared_a:
        return xa_v
    B, T = xa_v.shape[:2]
    return jnp.einsum("btar,bta->btr", xa_v.reshape(B, T, lora.num_agents, lora.rank),
                      jnp.broadcast_to(onehot_clipped, (B, T, lora.num_agents)))


# ----------------------------------------------------------------------------- the forward


def _add(base, deltas, name):
    return base if name not in deltas else (base.astype(F32) + deltas[name]).astype(base.dtype)


def _write_and_attend(q, k, v, lowrank, lora_b, adapter_index, cache, plan, *, attn_impl,
                      kv_indirect: bool, lowrank_indirect: bool):
    """Write a chunk's entries into one layer's cache and attend over it (or, without a cache,
    over the chunk itself); returns (attention output [B, T, N, H], cache)."""
    if cache is None:
        return flash_lora_attention(q, k, v, lowrank, lora_b, adapter_index,
                                    kv_lengths=plan.kv_lengths, q_offset=plan.q_offset,
                                    implementation=attn_impl), None
    cache = write_layer(cache, plan, k, v, lowrank)
    attn = flash_lora_attention(
        q, cache.k, cache.v, cache.lowrank if lora_b is not None else None, lora_b,
        adapter_index, kv_lengths=plan.kv_lengths, q_offset=plan.q_offset,
        implementation=attn_impl, kv_index=plan.kv_row if kv_indirect else None,
        lowrank_index=plan.lowrank_row if (lora_b is not None and lowrank_indirect) else None)
    return attn, cache


def _layer(x, lp, la, cache, *, config: ModelConfig, lora: LoraConfig | None, factored_v: bool,
           onehot, onehot_clipped, adapter_index, plan: ChunkPlan, inv_freq, attn_impl,
           kv_indirect: bool, lowrank_indirect: bool):
    B, T, _ = x.shape
    N, K, H = config.num_heads, config.num_kv_heads, config.head_dim
    m = lp["qkv"].shape[1]
    nq, nk = N // m * H, K // m * H

    widths = base_widths(config, m)
    adapted = la is not None

    def split(out, group):
        """(base output, x·A columns or None) of a group's matmul output."""
        if out.shape[-1] > widths[group]:
            xa = out[..., widths[group]:]
            return out[..., :widths[group]], (xa[:, :, 0] if xa.ndim == 4 else xa)
        return out, None

    h = rms_norm(x, lp["attn_norm"], config.rms_norm_eps)
    qkv, xa = split(constrain_shards(jnp.einsum("btd,dmc->btmc", h, lp["qkv"]), 2), "qkv")
    if "qkv_bias" in lp:
        qkv = qkv + lp["qkv_bias"].astype(qkv.dtype)
    q = qkv[..., :nq].reshape(B, T, N * H)
    k = qkv[..., nq:nq + nk].reshape(B, T, K * H)
    v = qkv[..., nq + nk:].reshape(B, T, K * H)
    lowrank = lora_b = None
    if adapted and "qkv" in la:
        pieces, deltas = _group_adapter(h, xa, la["qkv"], lora, "qkv", factored_v, onehot, config)
        q, k, v = _add(q, deltas, "q"), _add(k, deltas, "k"), _add(v, deltas, "v")
        if factored_v and "v" in pieces:
            lowrank = _select_lowrank(pieces["v"], onehot_clipped, lora)
            lora_b = la["v_b"].astype(q.dtype)
    q = apply_rope(q.reshape(B, T, N, H), plan.positions, inv_freq)
    k = apply_rope(k.reshape(B, T, K, H), plan.positions, inv_freq)
    v = v.reshape(B, T, K, H)

    # once per (data, model) shard on a mesh (a Pallas call is not partitioned by GSPMD)
    attn, cache = attention_per_shard(
        functools.partial(_write_and_attend, attn_impl=attn_impl, kv_indirect=kv_indirect,
                          lowrank_indirect=lowrank_indirect),
        q, k, v, lowrank, lora_b, adapter_index if lora_b is not None else None, cache, plan)

    attn = attn.reshape(B, T, N * H)
    o, xa = split(jnp.einsum("btc,cd->btd", attn, lp["o"]), "o")
    if adapted and "o" in la:
        _, deltas = _group_adapter(attn, xa, la["o"], lora, "o", factored_v, onehot, config)
        o = _add(o, deltas, "o")
    x = x + o
    h = rms_norm(x, lp["mlp_norm"], config.rms_norm_eps)
    gu, xa = split(constrain_shards(jnp.einsum("btd,dmc->btmc", h, lp["gate_up"]), 2),
                   "gate_up")
    half = config.intermediate_size // m
    gate = gu[..., :half].reshape(B, T, config.intermediate_size)
    up = gu[..., half:].reshape(B, T, config.intermediate_size)
    if adapted and "gate_up" in la:
        _, deltas = _group_adapter(h, xa, la["gate_up"], lora, "gate_up", factored_v, onehot,
                                   config)
        gate, up = _add(gate, deltas, "gate"), _add(up, deltas, "up")
    act = (jax.nn.silu(gate.astype(F32)) * up.astype(F32)).astype(h.dtype)
    down, xa = split(jnp.einsum("btf,fd->btd", act, lp["down"]), "down")
    if adapted and "down" in la:
        _, deltas = _group_adapter(act, xa, la["down"], lora, "down", factored_v, onehot, config)
        down = _add(down, deltas, "down")
    return x + down, cache


def forward_layers(params: dict, tokens: Int[Array, "B T"], *, config: ModelConfig,
                   lora: LoraConfig | None = None, adapters: tuple | None = None,
                   adapter_index: Int[Array, "B"] | Int[Array, "B T"] | None = None,
                   plan: ChunkPlan | None = None, cache: CacheArrays | None = None,
                   factored_v: bool = False, attn_impl: str | None = None,
                   kv_indirect: bool = True, lowrank_indirect: bool = True):
    """The decoder over new tokens in the inference layout; returns (final hidden states
    [B, T, D], updated cache).

    ``adapters``: prepared per-layer adapters (``prepare_adapters`` with the same ``factored_v``).
    ``adapter_index``: [B] (one agent per row) or [B, T] (one per token); -1 = no adapter.
    Without a cache, ``tokens`` are right-padded rows from position 0 (``plan`` optional). With a
    cache, ``plan`` says where the chunk sits and what it writes; every layer writes its entries
    and then attends over its buffers. ``kv_indirect`` / ``lowrank_indirect``: batch rows read cache
    rows ``plan.kv_row`` / ``plan.lowrank_row`` (False: row b reads row b, no gather).
    """
    B, T = tokens.shape
    if adapter_index is None:
        adapter_index = jnp.full((B,), -1, jnp.int32)
    if plan is None:
        if cache is not None:
            raise ValueError("a cache needs a ChunkPlan")
        plan = ChunkPlan.full_sequence(B, T)
    if adapters is not None and len(adapters) != config.num_layers:
        raise ValueError(f"prepared adapters have {len(adapters)} layers; the model has "
                         f"{config.num_layers}")
    x = constrain_rows(jnp.take(params["embed"], tokens, axis=0))
    onehot = onehot_clipped = None
    if adapters is not None:
        onehot = agent_onehot(adapter_index, lora.num_agents, x.dtype)
        onehot_clipped = agent_onehot(cache_view(adapter_index), lora.num_agents, x.dtype)
    inv_freq = rope_inv_freq(config)
    layer_caches = []
    for i, lp in enumerate(params["layers"]):
        x, layer_cache = _layer(
            x, lp, None if adapters is None else adapters[i],
            None if cache is None else cache.layer(i), config=config, lora=lora,
            factored_v=factored_v, onehot=onehot, onehot_clipped=onehot_clipped,
            adapter_index=adapter_index, plan=plan, inv_freq=inv_freq, attn_impl=attn_impl,
            kv_indirect=kv_indirect, lowrank_indirect=lowrank_indirect)
        layer_caches.append(layer_cache)
    if cache is not None:
        cache = CacheArrays.from_layers(layer_caches)
    return rms_norm(x, params["final_norm"], config.rms_norm_eps), cache


def inference_param_bytes(params: dict) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(params)))


def _host_gather(x, index) -> np.ndarray:
    """float32 values of ``x`` at an index tuple: numpy for host arrays (no compilation), a small
    gather on the device otherwise."""
    if isinstance(x, jax.Array) and not all(d.platform == "cpu" for d in x.devices()):
        return np.asarray(jax.device_get(x[index]), np.float32)
    return np.asarray(np.asarray(x)[index], np.float32)


def training_layout_views(params: dict, config: ModelConfig) -> dict:
    """The stacked (training-layout) tensors of inference-layout params as lazy views, without
    copying the weights: name ("layers/q", ...) -> (stacked shape, take), where ``take(index)``
    returns the float32 values at an index tuple of that stacked shape (numpy integer arrays).
    For cheap layout-independent reads such as a weights fingerprint."""
    N, K, H, F, D = (config.num_heads, config.num_kv_heads, config.head_dim,
                     config.intermediate_size, config.hidden_size)
    layers = params["layers"]
    L, m = len(layers), _shards(layers[0])
    nq, nk, half = N * H // m, K * H // m, F // m

    def gather(name, coords):
        def take(index):
            values = np.empty(len(index[0]), np.float32)
            for layer in np.unique(index[0]):
                rows = np.flatnonzero(index[0] == layer)
                at = coords(*(i[rows] for i in index[1:]))
                values[rows] = _host_gather(layers[layer][name], at)
            return values
        return take

    def fused(name, offset, width):
        if name == "qkv_bias":  # [m, C]
            return gather(name, lambda c: (c // width, offset + c % width))
        return gather(name, lambda d, c: (d, c // width, offset + c % width))  # [D, m, C]

    out = {k: (tuple(v.shape), lambda index, x=v: _host_gather(x, index))
           for k, v in params.items() if k != "layers"}
    out["layers/attn_norm"] = ((L, D), gather("attn_norm", lambda c: (c,)))
    out["layers/mlp_norm"] = ((L, D), gather("mlp_norm", lambda c: (c,)))
    out["layers/q"] = ((L, D, N * H), fused("qkv", 0, nq))
    out["layers/k"] = ((L, D, K * H), fused("qkv", nq, nk))
    out["layers/v"] = ((L, D, K * H), fused("qkv", nq + nk, nk))
    if "qkv_bias" in layers[0]:
        out["layers/q_bias"] = ((L, N * H), fused("qkv_bias", 0, nq))
        out["layers/k_bias"] = ((L, K * H), fused("qkv_bias", nq, nk))
        out["layers/v_bias"] = ((L, K * H), fused("qkv_bias", nq + nk, nk))
    out["layers/o"] = ((L, N * H, D), gather("o", lambda r, c: (r, c)))
    out["layers/gate"] = ((L, D, F), fused("gate_up", 0, half))
    out["layers/up"] = ((L, D, F), fused("gate_up", half, half))
    out["layers/down"] = ((L, F, D), gather("down", lambda r, c: (r, c)))
    return out
