"""The training objective: per-row negative log-likelihood of each output (and EOS) given its
prompt, with logits only at the loss positions (a [B, T, V] float32 tensor is never built), and the
per-role sums that validation and ``train.score`` report.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lragent_jax.config import ModelConfig
from lragent_jax.model import forward_hidden, logits_from_hidden


def training_attention(dtype, config: ModelConfig) -> str:
    """cuDNN's fused, differentiable attention on a GPU in half precision (head dim <= 128);
    the plain-JAX reference elsewhere. The Pallas kernels are forward-only."""
    if (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and config.head_dim <= 128):
        return "cudnn"
    return "reference"


def loss_terms(adapters: dict, params: dict, batch: Mapping[str, jax.Array], *,
               config: ModelConfig, remat: str = "full"):
    """Per-row sums over the loss positions: (nll [B], targets [B], all targets greedy-correct [B]).

    Only the ``W`` gathered positions of each row get logits: [B, W, V] instead of [B, T, V].
    """
    # shared view: each prompt token goes through the agent that would prefill it, and each
    # query applies its own B to the low-rank values (base+low-rank shared cache semantics)
    shared = "token_agents" in batch
    hidden, _ = forward_hidden(params, batch["tokens"], config=config, adapters=adapters,
                               adapter_index=batch["token_agents" if shared else "adapter_index"],
                               lengths=batch["lengths"], bake_v=not shared,
                               attn_impl=training_attention(params["embed"].dtype, config),
                               remat=remat)
    picked = jnp.take_along_axis(hidden, batch["label_positions"][..., None], axis=1)  # [B, W, D]
    logits = logits_from_hidden(params, picked, config)  # f32 [B, W, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    target_logp = jnp.take_along_axis(logp, batch["label_ids"][..., None], axis=-1)[..., 0]
    weights = batch["label_weights"]
    nll = -jnp.sum(target_logp * weights, axis=-1)
    correct = (jnp.argmax(logits, axis=-1) == batch["label_ids"]) | (weights == 0)
    return nll, jnp.sum(weights, axis=-1), jnp.all(correct, axis=-1)


def grad_fn(config: ModelConfig, remat: str):
    """``(adapters, params, batch) -> ((summed nll, target count), gradients wrt the adapters)``."""
    def summed(adapters, params, batch):
        nll, count, _ = loss_terms(adapters, params, batch, config=config, remat=remat)
        return jnp.sum(nll), jnp.sum(count)

    return jax.value_and_grad(summed, has_aux=True)


def per_role_totals(results, examples, num_agents: int):
    """Sum per-row (nll, target count, all-correct) results over each example's role.

    ``results`` yields (example indices of the rows, (nll [B], count [B], ok [B])).
    Returns nll, targets, correct, samples: float arrays [num_agents].
    """
    nll, targets, correct, samples = (np.zeros(num_agents) for _ in range(4))
    for indices, out in results:
        row_nll, row_count, row_ok = jax.device_get(out)
        for row, i in enumerate(indices):
            agent = examples[i].agent
            nll[agent] += row_nll[row]
            targets[agent] += row_count[row]
            correct[agent] += bool(row_ok[row])
            samples[agent] += 1
    return nll, targets, correct, samples
