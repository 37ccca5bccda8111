"""Rollouts over a forced 8-device CPU mesh (trajectories on ``data``, heads on ``model``) give the
same tokens as one device, in every sharing mode: through ``Session(mesh=...)`` (weights laid out
per shard, attention once per shard under ``shard_map``) on 4x2 and 2x2 meshes, through a sharded
``Model`` whose one copy of the weights its sessions share, and with the reference attention left
to GSPMD (sharded weights and cache, no mesh set around the turns; two modes)."""

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
    from lragent_jax.pretrained import Model
    from lragent_jax.session import GenerationSettings, Session, Turn
    from lragent_jax import sharding
    from tests.conftest import CharTokenizer

    assert jax.device_count() == 8, jax.devices()
    tok = CharTokenizer()
    # vocabulary 100: even, so the embedding and the output head are split over the model axis
    cfg = ModelConfig.tiny(vocab_size=100, eos_token_ids=(), num_heads=4, num_kv_heads=2,
                           intermediate_size=64)
    params = init_params(jax.random.key(0), cfg)
    lora = LoraConfig(rank=4, targets=("q", "v", "o", "down"))
    adapters = init_adapters(jax.random.key(1), cfg, lora, b_scale=0.3)
    meshes = {"4x2": sharding.make_mesh(data=4, model=2),
              "2x2": sharding.make_mesh(data=2, model=2, devices=jax.devices()[:4])}
    common = dict(batch=4, capacity=128, cache_dtype=jnp.float32, prefill_chunk=64,
                  min_chunk_bucket=64)

    def run(s):
        for row in range(4):
            s.append_text(row, f"Trajectory {row}: question?\n")
        agents = ["plan", "action", "reflect", "plan"]
        for step in range(3):
            s.turn({row: Turn(agents[(row + step) % 4], append=["T:", "\nA[", "]\nO: x\n"][step],
                              settings=GenerationSettings(max_new_tokens=5)) for row in range(4)})
        # sampled, one seed per row
        s.turn({row: Turn(agents[row], append="R:", settings=GenerationSettings(
            max_new_tokens=4, temperature=1.0, seed=row)) for row in range(4)})
        return s.tokens

    def spec(x):  # trailing Nones dropped (JAX keeps them on some arrays, not on others)
        axes = list(x.sharding.spec)
        while axes and axes[-1] is None:
            axes.pop()
        return str(tuple(axes))

    out = {"modes": {}}
    for mode in ["non_shared", "fully_shared", "base_shared", "base_lowrank_shared"]:
        got = {"one": run(Session(cfg, params, tok, adapters=adapters, lora=lora, mode=mode,
                                  **common))}
        for name, mesh in meshes.items():
            s = Session(cfg, params, tok, adapters=adapters, lora=lora, mode=mode, mesh=mesh,
                        **common)
            got[name] = run(s)
            if name == "4x2":
                layer = s.params["layers"][0]
                out.setdefault("specs", {})[mode] = {
                    "k": spec(s.cache.arrays.k[0]), "processed": spec(s.cache.processed),
                    "lowrank": spec(s.cache.arrays.lowrank[0]) if s.cache.arrays.lowrank else None,
                    "qkv": spec(layer["qkv"]), "o": spec(layer["o"]),
                    "gate_up": spec(layer["gate_up"]), "down": spec(layer["down"]),
                    "embed": spec(s.params["embed"]), "lm_head": spec(s.params["lm_head"]),
                    "qkv_local": list(layer["qkv"].addressable_shards[0].data.shape)}
        if mode not in ("non_shared", "base_lowrank_shared"):
            out["modes"][mode] = got
            continue
        # the reference attention under GSPMD: sharded weights and cache, no mesh around the turns
        mesh = meshes["4x2"]
        spec42 = CacheSpec.create(cfg, mode, num_agents=3, batch=4, capacity=128, lora=lora,
                                  dtype=jnp.float32)
        got["gspmd"] = run(Session(cfg, sharding.shard_inference_params(params, cfg, mesh), tok,
                                   adapters=sharding.replicate(adapters, mesh), lora=lora,
                                   mode=mode, cache_sharding=sharding.cache_shardings(spec42, mesh),
                                   **common))
        out["modes"][mode] = got

    mesh = meshes["2x2"]
    model = sharding.shard_model(Model(cfg, params, tok, adapters=adapters, lora=lora), mesh)
    s = model.session("base_lowrank_shared", mesh=mesh, **common)
    out["model_shares_weights"] = all(a is b for a, b in zip(jax.tree.leaves(s.params),
                                                             jax.tree.leaves(model.params)))
    out["model_tokens"] = run(s)

    errors = {}
    for name, make in {
            "heads": lambda: Session(cfg, params, tok, mesh=sharding.make_mesh(data=1, model=8)),
            "mesh_type": lambda: Session(cfg, params, tok, mesh="4x2")}.items():
        try:
            make()
        except ValueError as err:
            errors[name] = str(err)
    out["errors"] = errors
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
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for mode, runs in out["modes"].items():
        one = runs.pop("one")
        assert all(len(t) > 30 for t in one)
        for name, tokens in runs.items():
            assert tokens == one, (mode, name)
    assert out["model_shares_weights"]
    assert out["model_tokens"] == out["modes"]["base_lowrank_shared"]["4x2"]

    def p(*axes):
        return str(tuple(axes))

    for mode, specs in out["specs"].items():
        assert specs["k"] == p("data", None, "model"), mode
        assert specs["processed"] == p("data",), mode
        assert specs["qkv"] == p(None, "model") and specs["gate_up"] == p(None, "model")
        assert specs["o"] == p("model",) and specs["down"] == p("model",)
        assert specs["embed"] == p("model",) and specs["lm_head"] == p(None, "model")
        # one shard's q|k|v columns: (N/2 + 2·K/2)·H = (2 + 2)·16
        assert specs["qkv_local"] == [48, 1, 64]
    assert out["specs"]["base_lowrank_shared"]["lowrank"] == p("data",)  # replicated over model
    assert out["specs"]["non_shared"]["lowrank"] is None
    assert "model axis has size 8" in out["errors"]["heads"]
    assert "num_kv_heads=2" in out["errors"]["heads"]
    assert "mesh must be a jax.sharding.Mesh" in out["errors"]["mesh_type"]
