"""The optimizer and the compiled training step: AdamW without its learning rate (the step applies
the schedule and each phase's update mask, so one compiled step serves every phase), the warmup +
cosine schedule, and the jitted gradient / accumulate / apply / evaluate functions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lragent_jax.config import LoraConfig, ModelConfig
from train.config import Phase, TrainConfig
from train.loss import grad_fn, loss_terms


def update_mask(lora: LoraConfig, phase: Phase) -> dict:
    """Multipliers (broadcastable to each adapter leaf) that zero what a phase must not change."""
    b_mask = np.zeros((1, lora.num_agents, 1, 1), np.float32)
    b_mask[:, list(phase.train_b)] = 1.0
    return {m: {"a": np.float32(phase.train_a), "b": b_mask} for m in lora.targets}


def lr_schedule(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup from 0, then cosine decay to ``lr * min_lr_ratio`` over the phase's steps
    (optax's ``warmup_cosine_decay_schedule``, evaluated in plain Python: a jnp schedule read with
    float() would wait for the device to finish every queued step)."""
    peak, end = config.learning_rate, config.learning_rate * config.min_lr_ratio
    warmup = (config.warmup_steps if config.warmup_steps is not None
              else int(round(config.warmup_ratio * total_steps)))
    warmup = min(warmup, max(total_steps - 1, 0))
    decay = max(total_steps, warmup + 1) - warmup

    def schedule(step: int) -> float:
        if step < warmup:
            return peak * step / warmup
        progress = min(step - warmup, decay) / decay
        return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return schedule


def make_optimizer(clip_norm: float, b1: float, b2: float,
                   weight_decay: float) -> optax.GradientTransformation:
    """Global-norm clip -> Adam -> decoupled weight decay: AdamW without its learning rate, which
    the step applies (with the phase's update mask) so that the schedule and the mask are inputs
    of one compiled step rather than constants baked into a new one per phase."""
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.scale_by_adam(b1=b1, b2=b2),
                       optax.add_decayed_weights(weight_decay))


class StepFunctions:
    """The jitted pieces of a training step (compiled once per batch shape).

    ``apply`` masks the gradients before clipping (frozen parts must not count in the norm) and
    the updates after AdamW (weight decay must not move frozen parts either); it also says
    whether the new adapters are all finite.
    """

    def __init__(self, model_config: ModelConfig, remat: str, optimizer, adapter_sharding):
        value_and_grad = grad_fn(model_config, remat)

        def gradients(adapters, params, batch):
            (loss_sum, count), grads = value_and_grad(adapters, params, batch)
            return grads, loss_sum, count

        def accumulate(acc, adapters, params, batch):
            grads, loss_sum, count = gradients(adapters, params, batch)
            return jax.tree.map(jnp.add, acc, grads), loss_sum, count

        def apply(adapters, opt_state, acc, count, learning_rate, mask):
            grads = jax.tree.map(lambda g, m: g * m / jnp.maximum(count, 1.0), acc, mask)
            updates, opt_state = optimizer.update(grads, opt_state, adapters)
            updates = jax.tree.map(lambda u, m: -learning_rate * u * m, updates, mask)
            adapters = optax.apply_updates(adapters, updates)
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                        for x in jax.tree.leaves(adapters)]))
            return adapters, opt_state, optax.tree.norm(grads), finite

        def evaluate(adapters, params, batch):
            return loss_terms(adapters, params, batch, config=model_config, remat="none")

        self.optimizer = optimizer
        self.gradients = jax.jit(gradients, out_shardings=(adapter_sharding, None, None))
        self.accumulate = jax.jit(accumulate, donate_argnums=0,
                                  out_shardings=(adapter_sharding, None, None))
        self.apply = jax.jit(apply, donate_argnums=(0, 1))
        # per-row results replicated: with several processes each one reads every row
        self.evaluate = jax.jit(evaluate, out_shardings=adapter_sharding)


def step_functions(model_config: ModelConfig, config: TrainConfig,
                   adapter_sharding) -> StepFunctions:
    """The step functions of a run, cached on what the compiled steps depend on (not the whole
    config), so that runs in one process share them."""
    return _step_functions(model_config, config.remat, config.clip_norm, config.adam_b1,
                           config.adam_b2, config.weight_decay, adapter_sharding)


@functools.lru_cache(maxsize=8)
def _step_functions(model_config, remat, clip_norm, b1, b2, weight_decay, adapter_sharding):
    optimizer = make_optimizer(clip_norm, b1, b2, weight_decay)
    return StepFunctions(model_config, remat, optimizer, adapter_sharding)

