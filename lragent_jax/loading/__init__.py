"""Weights and tokenizers from HF checkpoint folders, GGUF files and the embedded default model."""

from lragent_jax.loading.embedded import EmbeddedModelMissing, embedded_model_path
from lragent_jax.loading.hf import (CheckpointError, load_hf_checkpoint, load_hf_config,
                                    param_shapes, save_hf_checkpoint)

__all__ = ["CheckpointError", "EmbeddedModelMissing", "embedded_model_path", "load_hf_checkpoint",
           "load_hf_config", "param_shapes", "save_hf_checkpoint"]
