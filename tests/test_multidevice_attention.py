"""Flash-LoRA attention once per (data, model) shard (``sharding.attention_per_shard``) on a forced
8-device CPU mesh: the Pallas kernels (Triton in interpret mode, Mosaic in TPU interpret mode)
run per shard on their rows and heads, with the cache write of the same layer, and give the
one-device reference's output and cache. The session cannot pass ``interpret=True``, so the
kernels are checked here directly; the rollouts (``test_multidevice_rollout.py``) run the same
per-shard path with the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r"""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from lragent_jax import sharding
    from lragent_jax.cache import ChunkPlan, LayerCache, write_layer
    from pallas_kernels.flash_lora_attention import flash_lora_attention

    assert jax.device_count() == 8, jax.devices()
    B, A, S, N, K, H, R = 4, 3, 64, 4, 2, 64, 8
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32))

    seen = []

    def body(impl):
        # what inference._write_and_attend does, with the kernel in interpret mode
        def run(q, k, v, lowrank, lora_b, index, cache, plan):
            seen.append({"q": q.shape, "k": cache.k.shape, "lowrank": cache.lowrank.shape,
                         "lora_b": lora_b.shape})
            cache = write_layer(cache, plan, k, v, lowrank)
            out = flash_lora_attention(q, cache.k, cache.v, cache.lowrank, lora_b, index,
                                       kv_lengths=plan.kv_lengths, q_offset=plan.q_offset,
                                       implementation=impl, interpret=impl != "reference",
                                       kv_index=plan.kv_row, lowrank_index=plan.lowrank_row)
            return out, cache
        return run

    results = []
    for T in (1, 16):  # the decode kernel and the prefill kernel
        agent = jnp.asarray([0, 2, 1, -1], jnp.int32)
        # per-agent rows b·A + agent (non-shared / base-shared layout): each row's cache rows lie
        # in its data shard, at a shard-local offset
        rows = jnp.arange(B, dtype=jnp.int32) * A + jnp.maximum(agent, 0)
        start = jnp.asarray([5, 20, 0, 33], jnp.int32)
        positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
        plan = ChunkPlan(positions=positions, q_offset=start, kv_lengths=start + T,
                         base_write=positions, lowrank_write=positions, kv_row=rows,
                         lowrank_row=rows)
        args = (normal(B, T, N, H), normal(B, T, K, H), normal(B, T, K, H), normal(B, T, R),
                0.3 * normal(A, K, R, H), agent,
                LayerCache(normal(B * A, S, K, H), normal(B * A, S, K, H), normal(B * A, S, R)),
                plan)
        want = jax.jit(lambda *a: sharding.attention_per_shard(body("reference"), *a))(*args)
        for data, model, impl in ((4, 2, "triton"), (2, 2, "triton"), (1, 2, "triton"),
                                  (2, 2, "mosaic_tpu")):
            mesh = sharding.make_mesh(data=data, model=model, devices=jax.devices()[:data * model])
            with jax.set_mesh(mesh):
                got = jax.jit(lambda *a: sharding.attention_per_shard(body(impl), *a))(*args)
            errors = [float(jnp.max(jnp.abs(g - w)))
                      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
            results.append({"T": T, "data": data, "model": model, "impl": impl,
                            "local": {k: list(v) for k, v in seen[-1].items()},
                            "out_spec": [a for a in got[0].sharding.spec],
                            "out_error": errors[0], "cache_error": max(errors[1:]),
                            "out_size": float(jnp.max(jnp.abs(want[0])))})
    print(json.dumps(results))
""")


def test_kernels_per_shard_match_the_reference():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 8
    for r in results:
        case = f"T{r['T']} {r['data']}x{r['model']} {r['impl']}"
        assert r["out_size"] > 0.1, case  # not a trivially small output
        assert r["out_error"] < 2e-5 and r["cache_error"] == 0.0, case
        # each shard saw its own rows and heads: B/data rows, N/model query heads, K/model kv
        # heads and their B; every rank column of the low-rank leaf
        rows = 4 // r["data"]
        assert r["local"] == {"q": [rows, r["T"], 4 // r["model"], 64],
                              "k": [3 * rows, 64, 2 // r["model"], 64],
                              "lowrank": [3 * rows, 64, 8], "lora_b": [3, 2 // r["model"], 8, 64]}
        data_axis = "data" if r["data"] > 1 else None
        assert r["out_spec"][:3] == [data_axis, None, "model"], case
