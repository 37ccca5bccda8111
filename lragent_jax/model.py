"""Pure-functional Llama-family decoder with per-row multi-agent LoRA: parameters, building blocks
and the training-layout forward.

Dimension alphabet: B batch, T new tokens, S cache positions, D model width, N query heads,
K kv heads, G = N/K, H head dim, R rank, A agents, L layers, V vocab, F mlp width.

Training-layout parameter pytree (weights stored [in, out], layers stacked on a leading L axis and
run under ``lax.scan`` with remat: a whole-sequence step amortises the per-layer slices and compile
time does not grow with depth). Inference (prefill and decode over the cache) uses one buffer per
layer with fused projections instead: ``lragent_jax.inference`` (``to_inference_params``).

    params = {"embed": [V, D], "final_norm": [D], "lm_head": [D, V] (untied only),
              "layers": {"attn_norm": [L, D], "mlp_norm": [L, D],
                         "q": [L, D, N*H], "k": [L, D, K*H], "v": [L, D, K*H], "o": [L, N*H, D],
                         "q_bias"/"k_bias"/"v_bias": [L, N*H | K*H] (qkv_bias only),
                         "gate": [L, D, F], "up": [L, D, F], "down": [L, F, D]}}

Head layout and RoPE follow Hugging Face (head n = columns n*H .. n*H+H-1, rotate-half RoPE).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lragent_jax.cache import ChunkPlan
from lragent_jax.config import ModelConfig
from lragent_jax.lora import expand_lowrank, lora_delta, project_lowrank
from pallas_kernels.flash_lora_attention import flash_lora_attention
from pallas_kernels.flash_lora_attention.reference import adapter_term

F32 = jnp.float32
REMAT_POLICIES = {False: None, "none": None, True: jax.checkpoint_policies.nothing_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


# ----------------------------------------------------------------------------- parameters


def param_shapes(config: ModelConfig) -> dict:
    L, D, F, V = config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    layers = {
        "attn_norm": (L, D), "mlp_norm": (L, D),
        "q": (L, D, config.q_dim), "k": (L, D, config.kv_dim), "v": (L, D, config.kv_dim),
        "o": (L, config.q_dim, D),
        "gate": (L, D, F), "up": (L, D, F), "down": (L, F, D),
    }
    if config.qkv_bias:
        layers.update(q_bias=(L, config.q_dim), k_bias=(L, config.kv_dim), v_bias=(L, config.kv_dim))
    shapes = {"embed": (V, D), "final_norm": (D,), "layers": layers}
    if not config.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def tiny_byte_params(dtype=F32) -> dict:
    """The weights of ``ModelConfig.tiny_byte()`` (``python -m train --model tiny`` and ``python
    -m eval --model tiny`` both use exactly these, so adapters trained by one load in the other)."""
    return jax.jit(init_params, static_argnums=(1, 2))(jax.random.key(0), ModelConfig.tiny_byte(),
                                                       jnp.dtype(dtype))


def init_params(key, config: ModelConfig, dtype=F32) -> dict:
    """Random weights of the real shapes (tests, speed benchmarks)."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, shape, path in zip(keys, leaves, paths):
        if "norm" in path:
            x = 1.0 + 0.1 * jax.random.normal(k, shape, F32)
        elif "bias" in path:
            x = 0.1 * jax.random.normal(k, shape, F32)
        elif "embed" in path:
            x = jax.random.normal(k, shape, F32)
        else:
            fan_in = shape[-2]
            x = jax.random.normal(k, shape, F32) / math.sqrt(fan_in)
        out.append(x.astype(dtype))
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x: Float[Array, "... D"], weight: Float[Array, "D"], eps: float):
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(F32)).astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [H/2], with llama3 / linear scaling (as Hugging Face computes them)."""
    h = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    if rs.kind == "linear":
        return inv_freq / rs.factor
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = ((rs.original_max_position_embeddings / wavelen - rs.low_freq_factor)
              / (rs.high_freq_factor - rs.low_freq_factor))
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def apply_rope(x: Float[Array, "B T heads H"], positions: Int[Array, "B T"], inv_freq: np.ndarray):
    angles = positions.astype(F32)[..., None] * jnp.asarray(inv_freq, F32)  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    half = x.shape[-1] // 2
    x1 = x[..., :half].astype(F32)
    x2 = x[..., half:].astype(F32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _project(h, layer_params, layer_adapters, module, adapter_index):
    y = jnp.einsum("btd,do->bto", h, layer_params[module])
    if layer_params.get(f"{module}_bias") is not None:
        y = y + layer_params[f"{module}_bias"].astype(y.dtype)
    if layer_adapters is not None and module in layer_adapters:
        y = y + lora_delta(h, layer_adapters[module], adapter_index).astype(y.dtype)
    return y


# ----------------------------------------------------------------------------- training attention


def factored_dense_attention(q, k, v, lowrank, lora_b, adapter_index, *,
                             implementation: str | None = "cudnn"):
    """Causal attention from position 0 (right-padded rows) with the factored v adapter, through
    ``jax.nn.dot_product_attention`` (cuDNN's fused, differentiable kernel on GPU).

    One fused call computes P·V_base and P·C together: the values are [V_base | C | 0] and q, k
    are zero-padded to the same width (the scores are unchanged, the scale stays 1/sqrt(H)); then
    each query row adds (P·C)·B of its own agent. ``adapter_index`` is [B] or [B, T]; < 0 adds
    nothing. This is the shared view of training at the speed of the plain one.
    """
    B, T, N, H = q.shape
    K, R = k.shape[2], lowrank.shape[-1]
    width = factored_width(H, R)
    pad = [(0, 0), (0, 0), (0, 0), (0, width - H)]
    values = jnp.concatenate(
        [v, jnp.broadcast_to(lowrank[:, :, None, :].astype(v.dtype), (B, T, K, R)),
         jnp.zeros((B, T, K, width - H - R), v.dtype)], axis=-1)
    out = jax.nn.dot_product_attention(jnp.pad(q, pad), jnp.pad(k, pad), values,
                                       scale=1.0 / float(np.sqrt(H)), is_causal=True,
                                       implementation=implementation)
    base, pc = out[..., :H], out[..., H:H + R]  # [B, T, N, H], [B, T, N, R]
    delta = adapter_term(pc.reshape(B, T, K, N // K, R), lora_b, adapter_index)
    return (base.astype(F32) + delta.reshape(B, T, N, H)).astype(q.dtype)


def factored_width(head_dim: int, rank: int) -> int:
    """Head width of the fused [V | C | 0] values: head_dim + rank, rounded up to 8."""
    return -(-(head_dim + rank) // 8) * 8


# ----------------------------------------------------------------------------- forward (training)


def _layer(x, layer_params, layer_adapters, *, config, adapter_index, plan, bake_v, attn_impl):
    B, T, _ = x.shape
    N, K, H = config.num_heads, config.num_kv_heads, config.head_dim
    inv_freq = rope_inv_freq(config)

    h = rms_norm(x, layer_params["attn_norm"], config.rms_norm_eps)
    q = _project(h, layer_params, layer_adapters, "q", adapter_index).reshape(B, T, N, H)
    k = _project(h, layer_params, layer_adapters, "k", adapter_index).reshape(B, T, K, H)
    v = _project(h, layer_params, None, "v", adapter_index)
    v_adapter = None if layer_adapters is None else layer_adapters.get("v")
    lowrank = None
    if v_adapter is not None:
        lowrank = project_lowrank(h, v_adapter["a"], adapter_index)  # [B, T, R]
        if bake_v:
            v = v + expand_lowrank(lowrank, v_adapter["b"], adapter_index).astype(v.dtype)
            lowrank = None
    v = v.reshape(B, T, K, H)
    q = apply_rope(q, plan.positions, inv_freq)
    k = apply_rope(k, plan.positions, inv_freq)
    lora_b = None
    if lowrank is not None:
        b = v_adapter["b"]  # [A, R, K*H] -> [A, K, R, H]
        lora_b = b.reshape(b.shape[0], b.shape[1], K, H).transpose(0, 2, 1, 3).astype(q.dtype)

    if (lowrank is not None and attn_impl == "cudnn"
            and factored_width(H, lowrank.shape[-1]) <= 256):  # cuDNN's widest head on Hopper
        attn = factored_dense_attention(q, k, v, lowrank, lora_b, adapter_index,
                                        implementation="cudnn")
    elif lowrank is not None:
        # factored v: every query row applies its own agent's B to the low-rank values of the
        # tokens it attends to (the base+low-rank shared view)
        attn = flash_lora_attention(q, k, v, lowrank, lora_b, adapter_index,
                                    kv_lengths=plan.kv_lengths, q_offset=plan.q_offset,
                                    implementation=attn_impl)
    elif attn_impl == "cudnn":
        # right-padded rows from position 0: causal masking alone hides the padding from every
        # valid query, and cuDNN's fused attention is differentiable (the training path on GPU)
        attn = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    else:
        attn = flash_lora_attention(q, k, v, kv_lengths=plan.kv_lengths, q_offset=plan.q_offset,
                                    implementation=attn_impl)

    x = x + _project(attn.reshape(B, T, N * H), layer_params, layer_adapters, "o", adapter_index)
    h = rms_norm(x, layer_params["mlp_norm"], config.rms_norm_eps)
    gate = _project(h, layer_params, layer_adapters, "gate", adapter_index)
    up = _project(h, layer_params, layer_adapters, "up", adapter_index)
    act = (jax.nn.silu(gate.astype(F32)) * up.astype(F32)).astype(h.dtype)
    return x + _project(act, layer_params, layer_adapters, "down", adapter_index)


def forward_hidden(params: dict, tokens: Int[Array, "B T"], *, config: ModelConfig,
                   adapters: dict | None = None,
                   adapter_index: Int[Array, "B"] | Int[Array, "B T"] | None = None,
                   lengths: Int[Array, "B"] | None = None, bake_v: bool = True,
                   attn_impl: str | None = None, remat: bool | str = False,
                   unroll: int | bool = 1):
    """The decoder over right-padded rows from position 0, in the training (stacked) layout, under
    ``lax.scan``; returns (final hidden states [B, T, D], None).

    ``lengths`` [B] gives each row's valid tokens; ``adapter_index`` may be [B, T]: the agent that
    processes each token (with ``bake_v=False`` this reproduces, in one pass, what a base+low-rank
    shared cache holds when each token was prefilled by that agent: the shared view of training).
    ``bake_v``: add the v adapter into the values instead of keeping it factored. ``attn_impl``:
    "cudnn" for cuDNN's fused, differentiable attention (GPU, half precision), anything else the
    plain-JAX reference (differentiable). ``remat``: False/"none", True/"full" (recompute the whole
    layer in the backward pass) or "dots" (keep the projections' outputs, recompute the rest).
    ``unroll``: layers per scan iteration. Inference with a cache uses the per-layer layout
    (``lragent_jax.inference``).
    """
    B, T = tokens.shape
    if adapter_index is None:
        adapter_index = jnp.full((B,), -1, jnp.int32)
    plan = ChunkPlan.full_sequence(B, T, lengths)
    compute_dtype = params["embed"].dtype
    x = jnp.take(params["embed"], tokens, axis=0).astype(compute_dtype)

    layer_fn = functools.partial(_layer, config=config, adapter_index=adapter_index, plan=plan,
                                 bake_v=bake_v, attn_impl=attn_impl)

    def body(x, xs):
        layer_params, layer_adapters = xs
        return layer_fn(x, layer_params, layer_adapters), None

    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; allowed: {sorted(map(str, REMAT_POLICIES))}")
    policy = REMAT_POLICIES[remat]
    if policy is not None:
        body = jax.checkpoint(body, policy=policy)
    x, _ = jax.lax.scan(body, x, (params["layers"], adapters), unroll=unroll)
    return rms_norm(x, params["final_norm"], config.rms_norm_eps), None


def logits_from_hidden(params: dict, hidden: Float[Array, "... D"], config: ModelConfig):
    """Vocabulary logits in float32."""
    if config.tie_embeddings:
        return jnp.einsum("...d,vd->...v", hidden, params["embed"], preferred_element_type=F32)
    return jnp.einsum("...d,dv->...v", hidden, params["lm_head"], preferred_element_type=F32)


def forward(params: dict, tokens: Int[Array, "B T"], *, config: ModelConfig,
            adapters: dict | None = None, adapter_index=None, lengths=None,
            attn_impl: str | None = None, lora=None) -> Float[Array, "B T V"]:
    """Full-sequence logits (no cache), float32 [B, T, V], in either layout.

    Stacked (training-layout) parameters run under ``lax.scan``; per-layer (inference-layout)
    parameters run the per-layer forward, which needs ``lora`` (the adapters' ``LoraConfig``)
    when ``adapters`` are given. ``adapters`` are always the stacked adapter pytree; with
    inference-layout params that carry appended A columns, they must be those adapters'.
    """
    from lragent_jax import inference

    if inference.is_inference_layout(params):
        if adapters is not None and lora is None:
            raise ValueError("forward() on inference-layout params with adapters needs lora=")
        fused = inference.fused_groups(params, config) if adapters is not None else frozenset()
        prepared = inference.prepare_adapters(adapters, config, lora, factored_v=False,
                                              dtype=params["embed"].dtype, fused=fused)
        B, T = tokens.shape
        hidden, _ = inference.forward_layers(
            params, tokens, config=config, lora=lora, adapters=prepared,
            adapter_index=adapter_index, plan=ChunkPlan.full_sequence(B, T, lengths),
            attn_impl=None if attn_impl == "cudnn" else attn_impl)
    else:
        hidden, _ = forward_hidden(params, tokens, config=config, adapters=adapters,
                                   adapter_index=adapter_index, lengths=lengths,
                                   attn_impl=attn_impl)
    return logits_from_hidden(params, hidden, config)
