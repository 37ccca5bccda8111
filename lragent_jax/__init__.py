"""lragent-jax: multi-LoRA LLM agents that share one KV cache.

    import lragent_jax
    m = lragent_jax.load_pretrained()          # embedded SmolLM2-135M-Instruct
    print(m.generate("The capital of France is", max_new_tokens=8))

Names are imported on first use, so host-side modules (``lragent_jax.workflow``,
``lragent_jax.tasks``) load without JAX.
"""

from lragent_jax._exports import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "ALL_MODES": "cache", "CacheSpec": "cache", "KVCache": "cache", "ShareMode": "cache",
    "analytic_cache_bytes": "cache",
    "ADAPTER_TARGETS": "config", "LoraConfig": "config", "ModelConfig": "config",
    "RopeScaling": "config",
    "NO_ADAPTER": "lora", "init_adapters": "lora", "merge_adapter": "lora",
    "Model": "pretrained", "load_pretrained": "pretrained",
    "CapacityError": "session", "GenerationSettings": "session", "Session": "session",
    "TokenAlignmentError": "session", "Turn": "session", "TurnResult": "session",
    "ModelPolicy": "agents", "run_model_episodes": "agents",
    "RolloutEngine": "rollout", "plan_rows": "rollout", "run_workflow": "rollout",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
