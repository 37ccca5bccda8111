"""Rollouts over a forced 8-device CPU mesh (trajectories on ``data``, heads on ``model``) give the
same tokens as one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r"""
    import json, sys
    import jax, jax.numpy as jnp
    from lragent_jax.cache import CacheSpec
    from lragent_jax.config import LoraConfig, ModelConfig
    from lragent_jax.lora import init_adapters
    from lragent_jax.model import init_params
    from lragent_jax.session import GenerationSettings, Session, Turn
    from lragent_jax import sharding
    from tests.conftest import CharTokenizer

    assert jax.device_count() == 8, jax.devices()
    tok = CharTokenizer()
    cfg = ModelConfig.tiny(vocab_size=tok.vocab_size, eos_token_ids=(), num_heads=4, num_kv_heads=2,
                           intermediate_size=64)
    params = init_params(jax.random.key(0), cfg)
    lora = LoraConfig(rank=4, targets=("q", "v", "o", "down"))
    adapters = init_adapters(jax.random.key(1), cfg, lora, b_scale=0.3)
    mesh = sharding.make_mesh(data=4, model=2)

    def rollout(mode, mesh):
        p, a, cache_sharding = params, adapters, None
        if mesh is not None:
            p = sharding.shard_params(params, cfg, mesh)
            a = sharding.replicate(adapters, mesh)
            spec = CacheSpec.create(cfg, mode, num_agents=3, batch=4, capacity=128, lora=lora,
                                    dtype=jnp.float32)
            cache_sharding = sharding.cache_shardings(spec, mesh)
        s = Session(cfg, p, tok, adapters=a, lora=lora, mode=mode, batch=4, capacity=128,
                    cache_dtype=jnp.float32, prefill_chunk=64, min_chunk_bucket=64,
                    cache_sharding=cache_sharding)
        if mesh is not None:
            assert all(len(k.sharding.device_set) == 8 for k in s.cache.arrays.k)
        for row in range(4):
            s.append_text(row, f"Trajectory {row}: question?\n")
        agents = ["plan", "action", "reflect", "plan"]
        for step in range(3):
            s.turn({row: Turn(agents[(row + step) % 4], append=["T:", "\nA[", "]\nO: x\n"][step],
                              settings=GenerationSettings(max_new_tokens=5)) for row in range(4)})
        return s.tokens

    out = {}
    for mode in ["non_shared", "fully_shared", "base_shared", "base_lowrank_shared"]:
        out[mode] = [rollout(mode, None), rollout(mode, mesh)]
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_sharded_rollouts_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for mode, (single, sharded) in results.items():
        assert single == sharded, mode
        assert all(len(t) > 20 for t in single)
