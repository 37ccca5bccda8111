"""Weights and tokenizers from HF checkpoint folders, GGUF files and the embedded default model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from lragent_jax.loading.embedded import (EmbeddedModelMissing, embedded_model_path,
                                          verify_embedded_model)
from lragent_jax.loading.gguf import (load_gguf, load_gguf_config, permute_qk_rows, save_gguf,
                                      unpermute_qk_rows)
from lragent_jax.loading.hf import (CheckpointError, load_hf_checkpoint, load_hf_config,
                                    save_hf_checkpoint)
from lragent_jax.model import param_shapes

__all__ = [
    "CheckpointError", "EmbeddedModelMissing", "embedded_model_path", "load_gguf",
    "load_gguf_config", "load_hf_checkpoint", "load_hf_config", "load_pretrained",
    "param_shapes", "permute_qk_rows", "save_gguf", "save_hf_checkpoint", "unpermute_qk_rows",
    "verify_embedded_model",
]


def load_pretrained(source: str | os.PathLike | None = None, dtype: Any = jnp.float32):
    """``(config, params, tokenizer)`` from a GGUF file, an HF checkpoint folder, or (``None``)
    the embedded default model."""
    from lragent_jax.tokenizer import Tokenizer

    path = embedded_model_path() if source is None else Path(source)
    if path.is_dir():
        config, params = load_hf_checkpoint(path, dtype)
        tokenizer = Tokenizer.from_hf_folder(path)
    elif path.is_file() and path.suffix.lower() == ".safetensors":
        raise FileNotFoundError(f"{path} is a single safetensors file; pass the HF checkpoint "
                                "folder that holds it together with its config.json (and "
                                "tokenizer files)")
    elif path.is_file():
        verify_embedded_model(path)
        config, params, metadata = load_gguf(path, dtype)
        tokenizer = Tokenizer.from_gguf_metadata(metadata)
    else:
        raise FileNotFoundError(f"model not found: {path} (expected a .gguf file or an HF "
                                "checkpoint folder)")
    # The embedding may be padded past the tokenizer, never the other way round.
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                         f"only {config.vocab_size} embeddings")
    return config, params, tokenizer
