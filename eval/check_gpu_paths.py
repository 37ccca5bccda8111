"""GPU-only checks run on the device machine (CPU CI covers the rest in interpret mode):
the cuDNN training attention gives the reference's loss and gradients, in the agent view (one
adapter per row) and in the shared view (one adapter per token, factored v adapter).

    python -m eval.check_gpu_paths
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.lora import init_adapters
from lragent_jax.model import forward_hidden, init_params, logits_from_hidden


def _loss(adapters, params, tokens, index, cfg, attn):
    hidden, _ = forward_hidden(params, tokens, config=cfg, adapters=adapters, adapter_index=index,
                               attn_impl=attn, remat="full", bake_v=index.ndim == 1)
    logits = logits_from_hidden(params, hidden[:, :-1], cfg)
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def main() -> int:
    if jax.default_backend() != "gpu":
        print("not on a GPU: nothing to check")
        return 0
    cfg = ModelConfig.smollm2_135m().replace(num_layers=4)
    params = init_params(jax.random.key(0), cfg, jnp.bfloat16)
    lora = LoraConfig(rank=8, targets=("q", "v", "o", "down"))
    adapters = init_adapters(jax.random.key(1), cfg, lora, b_scale=0.02)
    tokens = jax.random.randint(jax.random.key(2), (4, 384), 0, cfg.vocab_size)
    views = {"agent view": jnp.asarray([0, 1, 2, -1]),
             "shared view": jax.random.randint(jax.random.key(3), tokens.shape, -1, 3)}
    failed = 0
    for view, index in views.items():
        out = {}
        for attn in ("reference", "cudnn"):
            fn = jax.jit(jax.value_and_grad(_loss), static_argnames=("cfg", "attn"))
            out[attn] = fn(adapters, params, tokens, index, cfg=cfg, attn=attn)
        (l_ref, g_ref), (l_cud, g_cud) = out["reference"], out["cudnn"]
        rel = [float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(a.astype(
            jnp.float32))) for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_cud))]
        ok = abs(float(l_ref) - float(l_cud)) < 2e-2 and max(rel) < 5e-2
        print(f"cuDNN training attention, {view}: loss reference {float(l_ref):.5f} cudnn "
              f"{float(l_cud):.5f}; gradient relative difference max {max(rel):.2e}: "
              f"{'OK' if ok else 'MISMATCH'}")
        failed += not ok
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
