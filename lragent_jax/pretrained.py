"""``Model``: a loaded base model (+ optional multi-agent adapters) with logits and generation."""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lragent_jax.cache import ShareMode
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.generate import bucket
from lragent_jax.lora import NO_ADAPTER, validate_adapters
from lragent_jax.inference import (check_fused_adapters, fuse_adapters, fused_groups,
                                   to_inference_params)
from lragent_jax.model import forward
from lragent_jax.session import GenerationSettings, Session, Turn


@functools.partial(jax.jit, static_argnames=("config", "attn_impl", "lora"))
def _logits(params, tokens, lengths, adapters, adapter_index, *, config, attn_impl, lora):
    return forward(params, tokens, config=config, adapters=adapters, adapter_index=adapter_index,
                   lengths=lengths, attn_impl=attn_impl, lora=lora)


@dataclasses.dataclass
class Model:
    """A base model, its tokenizer and (optionally) role adapters."""

    config: ModelConfig
    params: dict
    tokenizer: Any
    adapters: dict | None = None
    lora: LoraConfig | None = None
    attn_impl: str | None = None

    def __post_init__(self):
        if (self.adapters is None) != (self.lora is None):
            raise ValueError("pass adapters together with their LoraConfig (or neither)")
        if self.adapters is not None:
            validate_adapters(self.adapters, self.config, self.lora)
        # inference layout, with the adapters' A matrices in the weights (one copy, shared by
        # every session of this model)
        self.params = to_inference_params(self.params, self.config)
        if self.adapters is not None and fused_groups(self.params, self.config):
            check_fused_adapters(self.params, self.config, self.adapters, self.lora)
        elif self.adapters is not None:
            self.params = fuse_adapters(self.params, self.config, self.adapters, self.lora)

    @property
    def dtype(self):
        return self.params["embed"].dtype

    def with_adapters(self, adapters: dict, lora: LoraConfig) -> "Model":
        """A model with ``adapters`` (in memory) attached: the base weights are not reloaded;
        the adapters' A matrices are appended to (or replace those in) the fused projection
        weights, a one-time copy that every session of the new model shares."""
        validate_adapters(adapters, self.config, lora)
        params = fuse_adapters(self.params, self.config, adapters, lora)
        return dataclasses.replace(self, params=params, adapters=adapters, lora=lora)

    def load_adapters(self, folder: str | os.PathLike = "default", *, dtype=None,
                      allow_other_weights: bool = False) -> "Model":
        """Attach role adapters from ``folder`` to this model in place (the base weights are not
        reloaded) and return it. ``folder``: an export of ``python -m train`` or
        ``adapters_io.save_adapters``, or ``"default"`` / ``"scienceqa"`` for the adapters shipped
        with the package (made for the embedded SmolLM2-135M-Instruct: the built-in task's, the
        published ScienceQA role files'). ``dtype``: of the adapters (default: the
        base weights' dtype). Adapters made for another base model, or for other weights of the
        same shape (unless ``allow_other_weights``), are refused."""
        from lragent_jax.adapters_io import load_adapters

        loaded, lora = load_adapters(resolve_adapters(folder), config=self.config,
                                     dtype=dtype or self.dtype, params=self.params,
                                     allow_other_weights=allow_other_weights)
        attached = self.with_adapters(loaded, lora)
        self.params, self.adapters, self.lora = attached.params, loaded, lora
        return self

    def _agent_index(self, agent) -> int:
        if agent is None:
            return NO_ADAPTER
        if self.lora is None:
            raise ValueError(f"agent {agent!r} given but the model has no adapters; use agent=None")
        return self.lora.agent_index(agent)

    def logits(self, batch: Sequence[Sequence[int]], *, agent: str | int | None = None):
        """Float32 logits [batch, tokens, vocab] of token-id sequences (right-padded to the longest;
        positions past a row's length are padding). ``agent``: whose adapter (None: none)."""
        if isinstance(batch, (str, bytes)) or not len(batch):
            raise ValueError("logits() takes a non-empty list of token-id lists")
        rows = [list(map(int, r)) for r in batch]
        if any(not r for r in rows):
            raise ValueError("logits(): every row needs at least one token")
        longest = max(map(len, rows))
        if longest > self.config.max_position_embeddings:
            raise ValueError(f"a row has {longest} tokens; the model supports "
                             f"{self.config.max_position_embeddings}")
        padded = bucket(longest, 16)
        tokens = np.zeros((len(rows), padded), np.int32)
        for i, r in enumerate(rows):
            bad = [t for t in r if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"row {i}: token ids {bad[:5]} out of range for vocab size "
                                 f"{self.config.vocab_size}")
            tokens[i, :len(r)] = r
        index = jnp.full((len(rows),), self._agent_index(agent), jnp.int32)
        out = _logits(self.params, jnp.asarray(tokens), jnp.asarray([len(r) for r in rows]),
                      self.adapters if agent is not None else None, index, config=self.config,
                      attn_impl=self.attn_impl, lora=self.lora if agent is not None else None)
        return out[:, :longest]

    def session(self, mode: str = "base_lowrank_shared", *, batch: int = 1, capacity: int = 2048,
                **kwargs) -> Session:
        """A multi-agent session over this model (see ``Session``)."""
        kwargs.setdefault("attn_impl", self.attn_impl)
        mode = ShareMode.parse(mode)  # an unknown name is an error even without adapters
        return Session(self.config, self.params, self.tokenizer, adapters=self.adapters,
                       lora=self.lora, mode=mode if self.lora is not None else "non_shared",
                       batch=batch, capacity=capacity, **kwargs)

    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 32, *,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 stop: Sequence[str] = (), agent: str | int | None = None, chat: bool = False,
                 capacity: int | None = None):
        """Complete a prompt (or a list of prompts, batched). Greedy by default.

        ``chat=True`` wraps each prompt as a user message in the model's chat template and stops at
        the end-of-turn token. Returns a string, or a list of strings for a list of prompts.
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, top_k=top_k, stop=tuple(stop))
        if chat:
            prompts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                          add_generation_prompt=True)
                       for p in prompts]
        encoded = [self.tokenizer.encode(p) for p in prompts]
        if any(not ids for ids in encoded):
            raise ValueError("generate(): a prompt encodes to no tokens")
        need = max(map(len, encoded)) + max_new_tokens
        capacity = capacity or bucket(need, 64)
        if need > capacity:
            raise ValueError(f"a prompt of {max(map(len, encoded))} tokens plus {max_new_tokens} new "
                             f"tokens does not fit the cache capacity {capacity}")
        session = Session(self.config, self.params, self.tokenizer, adapters=self.adapters,
                          lora=self.lora, mode="non_shared", batch=len(prompts),
                          capacity=capacity, attn_impl=self.attn_impl, seed=seed)
        agent_name = agent if agent is not None else None
        results = session.turn({row: Turn(agent_name, append_ids=tuple(ids), settings=settings)
                                for row, ids in enumerate(encoded)})
        texts = [results[row].text for row in range(len(prompts))]
        return texts[0] if single else texts


SHIPPED_ADAPTERS = "smollm2-135m-kb"
# the names ``adapters=`` takes for the adapter sets shipped in the package (all for the embedded
# SmolLM2-135M-Instruct, shared A): "default" the built-in task's, "scienceqa" the published
# ScienceQA role files' (mixed view; the command and validation figures are in its manifest)
SHIPPED = {"default": SHIPPED_ADAPTERS, "scienceqa": "smollm2-135m-scienceqa"}


def shipped_adapters_path(name: str = "default") -> Path | None:
    """The folder of a role-adapter set shipped in the package (``name``: a key of ``SHIPPED``;
    "default": trained on the built-in task), or None when the package does not have it."""
    if name not in SHIPPED:
        raise ValueError(f"no shipped adapters named {name!r}; shipped: {', '.join(SHIPPED)}")
    path = Path(str(importlib.resources.files("lragent_jax"))) / "assets" / "adapters" / \
        SHIPPED[name]
    return path if path.is_dir() else None


def resolve_adapters(folder: str | os.PathLike) -> Path:
    """A name of ``SHIPPED`` (``"default"``, ``"scienceqa"``) -> that shipped set's folder; any
    other value is a path."""
    name = str(folder)
    if name in SHIPPED and not Path(name).exists():
        path = shipped_adapters_path(name)
        if path is None:
            raise FileNotFoundError(f"adapters={name!r}: this installation of lragent_jax does "
                                    f"not ship them (assets/adapters/{SHIPPED[name]} is missing)")
        return path
    return Path(folder)


def load_pretrained(source: str | os.PathLike | None = None, *, dtype=jnp.float32,
                    adapters: str | os.PathLike | None = None,
                    attn_impl: str | None = None, allow_other_weights: bool = False) -> Model:
    """Load a base model: the embedded SmolLM2-135M-Instruct (``source=None``), a ``.gguf`` file, or
    a Hugging Face checkpoint folder (config.json + safetensors). ``adapters``: a folder of exported
    role adapters to attach, or ``"default"`` for the shipped ones (see ``Model.load_adapters``;
    refused if trained on other weights, unless ``allow_other_weights``)."""
    from lragent_jax.loading import load_pretrained as load_files

    config, params, tokenizer = load_files(source, dtype)
    # inference runs on one buffer per layer (lragent_jax.inference); the stacked arrays are
    # released as their per-layer copies are made
    params = to_inference_params(params, config, donate=True)
    model = Model(config=config, params=params, tokenizer=tokenizer, attn_impl=attn_impl)
    if adapters is not None:
        model.load_adapters(adapters, dtype=dtype, allow_other_weights=allow_other_weights)
    return model
