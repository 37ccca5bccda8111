"""Pure-functional Llama-family decoder with per-row multi-agent LoRA: parameters, building blocks
and the training-layout forward.

Dimension alphabet: B batch, T new tokens, S cache positions, D model width, N query heads,
K kv heads, G = N/K, H head dim, R rank, A agents, L layers, V vocab, F mlp width.

Training-layout parameter pytree (weights stored [in, out], layers stacked on a leading L axis and
run under ``lax.scan`` with remat: a whole-sequence step amortises the per-layer slices and compile
time does not grow with depth). Inference (prefill and decode over the cache) uses one buffer per
layer with fused projections instead: ``lragent_jax.inference`` (``to_inference_params``).
The leaves are written out once, as data, in ``PARAM_LEAVES`` (shapes, HF and GGUF names, how each
splits over the model mesh axis); in short:

    params = {"embed": [V, D], "final_norm": [D], "lm_head": [D, V] (untied only),
              "layers": {"attn_norm": [L, D], "mlp_norm": [L, D],
                         "q": [L, D, N*H], "k": [L, D, K*H], "v": [L, D, K*H], "o": [L, N*H, D],
                         "q_bias"/"k_bias"/"v_bias": [L, N*H | K*H] (qkv_bias only),
                         "gate": [L, D, F], "up": [L, D, F], "down": [L, F, D]}}

Head layout and RoPE follow Hugging Face (head n = columns n*H .. n*H+H-1, rotate-half RoPE).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Key

from lragent_jax.cache import ChunkPlan
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.lora import expand_lowrank, lora_delta, project_lowrank
from pallas_kernels.flash_lora_attention import flash_lora_attention
from pallas_kernels.flash_lora_attention.reference import adapter_term

F32 = jnp.float32
REMAT_POLICIES = {False: None, "none": None, True: jax.checkpoint_policies.nothing_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


# ----------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class ParamLeaf:
    """One leaf of the training-layout parameter pytree: the one written description of its shape,
    its names in HF checkpoints and GGUF files, and how it splits over the ``model`` mesh axis.
    ``param_shapes``, ``init_params`` and the HF / GGUF loaders and savers read ``PARAM_LEAVES``.

    name:         the leaf's key (under ``params["layers"]`` when ``per_layer``)
    per_layer:    stacked on a leading L axis, one slice per decoder layer
    dims:         ``ModelConfig`` attributes giving its shape, without L ("hidden_size", "q_dim")
    kind:         "embedding", "norm", "bias" or "matrix" (a [in, out] weight): how
                  ``init_params`` draws it
    present:      None (every config) or the config condition that adds it: "untied" (not
                  ``tie_embeddings``) or "qkv_bias"
    hf_key:       its tensor name in an HF checkpoint; ``{layer}`` stands for the layer index
    hf_transposed: HF stores it [out, in]: transposed on load and save
    gguf_name:    its tensor name in a GGUF file (``{layer}`` as above)
    rope_heads:   for q and k (weight and bias): the ``ModelConfig`` attribute counting the heads
                  whose rows RoPE rotates (llama.cpp interleaves those rows in "llama" GGUF files)
    model_axis:   the axis split over the ``model`` mesh axis, counted from the end so that it
                  holds for the stacked and the per-layer layouts alike; None: replicated
    model_split:  the ``ModelConfig`` attribute counting the groups along ``model_axis`` (whole
                  heads, or MLP columns): split only when the mesh's model size divides it
    """

    name: str
    per_layer: bool
    dims: tuple[str, ...]
    kind: str
    hf_key: str
    gguf_name: str
    hf_transposed: bool = False
    present: str | None = None
    rope_heads: str | None = None
    model_axis: int | None = None
    model_split: str | None = None

    def is_present(self, config: ModelConfig) -> bool:
        if self.present == "untied":
            return not config.tie_embeddings
        if self.present == "qkv_bias":
            return config.qkv_bias
        return True

    def shape(self, config: ModelConfig, *, stacked: bool = True) -> tuple[int, ...]:
        """Its shape for ``config``; with the leading L axis when ``per_layer`` and ``stacked``."""
        dims = tuple(int(getattr(config, d)) for d in self.dims)
        return (config.num_layers, *dims) if self.per_layer and stacked else dims


def _layer_leaf(name, dims, kind, hf, gguf, **rest) -> ParamLeaf:
    return ParamLeaf(name, True, dims, kind, f"model.layers.{{layer}}.{hf}",
                     f"blk.{{layer}}.{gguf}", **rest)


_WEIGHT = dict(kind="matrix", hf_transposed=True)
_HEADS_OUT = dict(model_axis=-1, model_split="num_heads")
_KV_HEADS_OUT = dict(model_axis=-1, model_split="num_kv_heads")
# in the order of HF's and llama.cpp's tensor listings (the order the savers write)
PARAM_LEAVES: tuple[ParamLeaf, ...] = (
    ParamLeaf("embed", False, ("vocab_size", "hidden_size"), "embedding",
              "model.embed_tokens.weight", "token_embd.weight"),
    ParamLeaf("final_norm", False, ("hidden_size",), "norm", "model.norm.weight",
              "output_norm.weight"),
    ParamLeaf("lm_head", False, ("hidden_size", "vocab_size"), "matrix", "lm_head.weight",
              "output.weight", hf_transposed=True, present="untied"),
    _layer_leaf("attn_norm", ("hidden_size",), "norm", "input_layernorm.weight",
                "attn_norm.weight"),
    _layer_leaf("mlp_norm", ("hidden_size",), "norm", "post_attention_layernorm.weight",
                "ffn_norm.weight"),
    _layer_leaf("q", ("hidden_size", "q_dim"), hf="self_attn.q_proj.weight",
                gguf="attn_q.weight", rope_heads="num_heads", **_WEIGHT, **_HEADS_OUT),
    _layer_leaf("k", ("hidden_size", "kv_dim"), hf="self_attn.k_proj.weight",
                gguf="attn_k.weight", rope_heads="num_kv_heads", **_WEIGHT, **_KV_HEADS_OUT),
    _layer_leaf("v", ("hidden_size", "kv_dim"), hf="self_attn.v_proj.weight",
                gguf="attn_v.weight", **_WEIGHT, **_KV_HEADS_OUT),
    _layer_leaf("o", ("q_dim", "hidden_size"), hf="self_attn.o_proj.weight",
                gguf="attn_output.weight", model_axis=-2, model_split="num_heads", **_WEIGHT),
    _layer_leaf("q_bias", ("q_dim",), "bias", "self_attn.q_proj.bias", "attn_q.bias",
                present="qkv_bias", rope_heads="num_heads", **_HEADS_OUT),
    _layer_leaf("k_bias", ("kv_dim",), "bias", "self_attn.k_proj.bias", "attn_k.bias",
                present="qkv_bias", rope_heads="num_kv_heads", **_KV_HEADS_OUT),
    _layer_leaf("v_bias", ("kv_dim",), "bias", "self_attn.v_proj.bias", "attn_v.bias",
                present="qkv_bias", **_KV_HEADS_OUT),
    _layer_leaf("gate", ("hidden_size", "intermediate_size"), hf="mlp.gate_proj.weight",
                gguf="ffn_gate.weight", model_axis=-1, model_split="intermediate_size",
                **_WEIGHT),
    _layer_leaf("up", ("hidden_size", "intermediate_size"), hf="mlp.up_proj.weight",
                gguf="ffn_up.weight", model_axis=-1, model_split="intermediate_size", **_WEIGHT),
    _layer_leaf("down", ("intermediate_size", "hidden_size"), hf="mlp.down_proj.weight",
                gguf="ffn_down.weight", model_axis=-2, model_split="intermediate_size",
                **_WEIGHT),
)


def param_leaves(config: ModelConfig) -> tuple[ParamLeaf, ...]:
    """The leaves ``config`` has, in ``PARAM_LEAVES`` order."""
    return tuple(leaf for leaf in PARAM_LEAVES if leaf.is_present(config))


def param_shapes(config: ModelConfig) -> dict:
    """The parameter pytree's structure with shape tuples as leaves (per-layer leaves carry L)."""
    shapes: dict = {"layers": {}}
    for leaf in param_leaves(config):
        (shapes["layers"] if leaf.per_layer else shapes)[leaf.name] = leaf.shape(config)
    return shapes


def tiny_byte_params(dtype=F32) -> dict:
    """The weights of ``ModelConfig.tiny_byte()`` (``python -m train --model tiny`` and ``python
    -m eval --model tiny`` both use exactly these, so adapters trained by one load in the other)."""
    return jax.jit(init_params, static_argnums=(1, 2))(jax.random.key(0), ModelConfig.tiny_byte(),
                                                       jnp.dtype(dtype))


def init_params(key: Key[Array, ""], config: ModelConfig, dtype=F32) -> dict:
    """Random weights of the real shapes (tests, speed benchmarks)."""
    shapes = param_shapes(config)
    kinds = {leaf.name: leaf.kind for leaf in PARAM_LEAVES}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, (path, shape) in zip(keys, leaves):
        kind = kinds[path[-1].key]
        if kind == "norm":
            x = 1.0 + 0.1 * jax.random.normal(k, shape, F32)
        elif kind == "bias":
            x = 0.1 * jax.random.normal(k, shape, F32)
        elif kind == "embedding":
            x = jax.random.normal(k, shape, F32)
        else:
            fan_in = shape[-2]
            x = jax.random.normal(k, shape, F32) / math.sqrt(fan_in)
        out.append(x.astype(dtype))
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x: Float[Array, "... D"], weight: Float[Array, "D"],
             eps: float) -> Float[Array, "... D"]:
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(F32)).astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> Float[np.ndarray, "H//2"]:
    """Inverse RoPE frequencies [H/2] (float64), with llama3 / linear scaling (as Hugging Face
    computes them)."""
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


def apply_rope(x: Float[Array, "B T heads H"], positions: Int[Array, "B T"],
               inv_freq: Float[np.ndarray, "H//2"]) -> Float[Array, "B T heads H"]:
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


def factored_dense_attention(q: Float[Array, "B T N H"], k: Float[Array, "B T K H"],
                             v: Float[Array, "B T K H"], lowrank: Float[Array, "B T R"],
                             lora_b: Float[Array, "A K R H"],
                             adapter_index: Int[Array, "B"] | Int[Array, "B T"], *,
                             implementation: str | None = "cudnn") -> Float[Array, "B T N H"]:
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
                   unroll: int | bool = 1) -> tuple[Float[Array, "B T D"], None]:
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


def logits_from_hidden(params: dict, hidden: Float[Array, "... D"],
                       config: ModelConfig) -> Float[Array, "... V"]:
    """Vocabulary logits in float32."""
    if config.tie_embeddings:
        return jnp.einsum("...d,vd->...v", hidden, params["embed"], preferred_element_type=F32)
    return jnp.einsum("...d,dv->...v", hidden, params["lm_head"], preferred_element_type=F32)


def forward(params: dict, tokens: Int[Array, "B T"], *, config: ModelConfig,
            adapters: dict | None = None,
            adapter_index: Int[Array, "B"] | Int[Array, "B T"] | None = None,
            lengths: Int[Array, "B"] | None = None, attn_impl: str | None = None,
            lora: LoraConfig | None = None) -> Float[Array, "B T V"]:
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
