"""lragent-jax: multi-LoRA LLM agents that share one KV cache.

    import lragent_jax
    m = lragent_jax.load_pretrained()          # embedded SmolLM2-135M-Instruct
    print(m.generate("The capital of France is", max_new_tokens=8))
"""

from lragent_jax.cache import ALL_MODES, CacheSpec, KVCache, ShareMode, analytic_cache_bytes
from lragent_jax.config import ADAPTER_TARGETS, LoraConfig, ModelConfig, RopeScaling
from lragent_jax.lora import NO_ADAPTER, init_adapters, merge_adapter
from lragent_jax.pretrained import Model, load_pretrained
from lragent_jax.session import (CapacityError, GenerationSettings, Session, TokenAlignmentError,
                                 Turn, TurnResult)

__version__ = "0.1.0"

__all__ = [
    "ADAPTER_TARGETS", "ALL_MODES", "CacheSpec", "CapacityError", "GenerationSettings", "KVCache",
    "LoraConfig", "Model", "ModelConfig", "NO_ADAPTER", "RopeScaling", "Session", "ShareMode",
    "TokenAlignmentError", "Turn", "TurnResult", "analytic_cache_bytes", "init_adapters",
    "load_pretrained", "merge_adapter",
]
