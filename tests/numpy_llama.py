"""An independent float64 numpy implementation of the Llama-family forward, for tests.

Written from the Hugging Face Llama/Qwen2 modelling code's definitions (RMSNorm, rotate-half RoPE with
llama3 frequency scaling, GQA by repeating kv heads, SwiGLU), with per-head loops instead of einsums so
it shares no code or layout tricks with the package. LoRA: y = x W + (x A) B per row.
"""

from __future__ import annotations

import math

import numpy as np


def _inv_freq(cfg) -> np.ndarray:
    dim = cfg.head_dim
    inv = np.array([1.0 / (cfg.rope_theta ** (2 * i / dim)) for i in range(dim // 2)])
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    if rs.kind == "linear":
        return inv / rs.factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < rs.original_max_position_embeddings / rs.high_freq_factor:
            out.append(f)
        elif wavelen > rs.original_max_position_embeddings / rs.low_freq_factor:
            out.append(f / rs.factor)
        else:
            smooth = ((rs.original_max_position_embeddings / wavelen - rs.low_freq_factor)
                      / (rs.high_freq_factor - rs.low_freq_factor))
            out.append((1 - smooth) * f / rs.factor + smooth * f)
    return np.array(out)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, inv_freq):
    # x [T, H]; rotate-half convention
    half = x.shape[-1] // 2
    ang = np.outer(pos, inv_freq)
    cos = np.concatenate([np.cos(ang), np.cos(ang)], axis=-1)
    sin = np.concatenate([np.sin(ang), np.sin(ang)], axis=-1)
    rot = np.concatenate([-x[:, half:], x[:, :half]], axis=-1)
    return x * cos + rot * sin


def llama_forward(params, cfg, tokens, adapters=None, agent=None):
    """Logits [T, V] for one sequence (float64). ``adapters`` in the package's layout, ``agent`` int."""
    p = {k: (np.asarray(v, np.float64) if not isinstance(v, dict) else
             {kk: np.asarray(vv, np.float64) for kk, vv in v.items()}) for k, v in params.items()}
    lay = p["layers"]
    T = len(tokens)
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    inv_freq = _inv_freq(cfg)
    pos = np.arange(T, dtype=np.float64)

    def lin(x, layer, name):
        y = x @ lay[name][layer]
        if cfg.qkv_bias and name in ("q", "k", "v"):
            y = y + lay[f"{name}_bias"][layer]
        if adapters is not None and agent is not None and agent >= 0 and name in adapters:
            a = np.asarray(adapters[name]["a"], np.float64)
            b = np.asarray(adapters[name]["b"], np.float64)
            a_l = a[layer] if a.ndim == 3 else a[layer, agent]
            y = y + (x @ a_l) @ b[layer, agent]
        return y

    x = p["embed"][np.asarray(tokens)]
    for layer in range(cfg.num_layers):
        h = _rms(x, lay["attn_norm"][layer], cfg.rms_norm_eps)
        q = lin(h, layer, "q")
        k = lin(h, layer, "k")
        v = lin(h, layer, "v")
        heads = []
        for n in range(N):
            kv = n // (N // K)
            qn = _rope(q[:, n * H:(n + 1) * H], pos, inv_freq)
            kn = _rope(k[:, kv * H:(kv + 1) * H], pos, inv_freq)
            vn = v[:, kv * H:(kv + 1) * H]
            s = qn @ kn.T / math.sqrt(H)
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s = s / s.sum(axis=-1, keepdims=True)
            heads.append(s @ vn)
        x = x + lin(np.concatenate(heads, axis=-1), layer, "o")
        h = _rms(x, lay["mlp_norm"][layer], cfg.rms_norm_eps)
        g = lin(h, layer, "gate")
        u = lin(h, layer, "up")
        x = x + lin(g / (1 + np.exp(-g)) * u, layer, "down")
    x = _rms(x, p["final_norm"], cfg.rms_norm_eps)
    head = p["embed"].T if cfg.tie_embeddings else p["lm_head"]
    return x @ head
