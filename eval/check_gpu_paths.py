"""GPU-only checks run on the device machine (CPU CI covers the rest in interpret mode):
the cuDNN training attention gives the reference's loss and gradients, in the agent view (one
adapter per row) and in the shared view (one adapter per token, factored v adapter); and sessions
whose attention is chosen per call shape (Triton decode kernel, Triton prefill kernel, cuDNN with
the adapter term materialised) score a multi-agent trajectory as the plain-JAX reference does, in
every sharing mode; and the long-prefill lane gives every row the cache entries and tokens of the
same call without it, in every sharing mode.

    python -m eval.check_gpu_paths
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.lora import init_adapters
from lragent_jax.model import forward_hidden, init_params, logits_from_hidden


def _loss(adapters, params, tokens, index, cfg, attn):
    hidden, _ = forward_hidden(params, tokens, config=cfg, adapters=adapters, adapter_index=index,
                               attn_impl=attn, remat="full", bake_v=index.ndim == 1)
    logits = logits_from_hidden(params, hidden[:, :-1], cfg)
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def main() -> int:
    if jax.default_backend() != "gpu":
        print("not on a GPU: nothing to check")
        return 0
    cfg = ModelConfig.smollm2_135m().replace(num_layers=4)
    params = init_params(jax.random.key(0), cfg, jnp.bfloat16)
    lora = LoraConfig(rank=8, targets=("q", "v", "o", "down"))
    adapters = init_adapters(jax.random.key(1), cfg, lora, b_scale=0.02)
    tokens = jax.random.randint(jax.random.key(2), (4, 384), 0, cfg.vocab_size)
    views = {"agent view": jnp.asarray([0, 1, 2, -1]),
             "shared view": jax.random.randint(jax.random.key(3), tokens.shape, -1, 3)}
    failed = 0
    for view, index in views.items():
        out = {}
        for attn in ("reference", "cudnn"):
            fn = jax.jit(jax.value_and_grad(_loss), static_argnames=("cfg", "attn"))
            out[attn] = fn(adapters, params, tokens, index, cfg=cfg, attn=attn)
        (l_ref, g_ref), (l_cud, g_cud) = out["reference"], out["cudnn"]
        rel = [float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(a.astype(
            jnp.float32))) for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_cud))]
        ok = abs(float(l_ref) - float(l_cud)) < 2e-2 and max(rel) < 5e-2
        print(f"cuDNN training attention, {view}: loss reference {float(l_ref):.5f} cudnn "
              f"{float(l_cud):.5f}; gradient relative difference max {max(rel):.2e}: "
              f"{'OK' if ok else 'MISMATCH'}")
        failed += not ok
    failed += check_dispatched_sessions()
    failed += check_long_lane()
    return 1 if failed else 0


def _small_llama(seed: int):
    """A 2-layer Llama-shaped model (GQA 8/2 heads, head dim 128, 512-token vocabulary) in the
    inference layout, bf16, with rank-16 adapters on every target: (config, params, lora,
    adapters)."""
    from lragent_jax.inference import to_inference_params

    cfg = ModelConfig.llama3_1_8b().replace(num_layers=2, vocab_size=512, hidden_size=1024,
                                            intermediate_size=2048, num_heads=8, num_kv_heads=2,
                                            eos_token_ids=(), bos_token_id=None)
    params = to_inference_params(init_params(jax.random.key(seed), cfg, jnp.bfloat16), cfg)
    lora = LoraConfig(rank=16, targets=("q", "v", "o", "gate", "up", "down"))
    adapters = init_adapters(jax.random.key(seed + 1), cfg, lora, dtype=jnp.bfloat16,
                             b_scale=0.05)
    return cfg, params, lora, adapters


def check_dispatched_sessions() -> int:
    """Teacher-forced log-probs of a 3-agent trajectory: dispatched attention vs reference."""
    from lragent_jax.cache import ALL_MODES
    from lragent_jax.session import GenerationSettings, Session, Turn
    from eval.common import NullTokenizer

    cfg, params, lora, adapters = _small_llama(0)
    rng = np.random.default_rng(0)
    # (agent, appended tokens, scored tokens): chunks of 300 (cuDNN), 40 (prefill kernel), 1-16
    script = [("plan", 300, 12), ("action", 40, 6), ("plan", 1, 3), ("reflect", 700, 16)]
    draws = [(a, rng.integers(3, 512, n).tolist(), rng.integers(3, 512, m).tolist())
             for a, n, m in script]
    failed = 0
    for mode in ALL_MODES:
        scores = {}
        for attn in ("reference", None):
            s = Session(cfg, params, NullTokenizer(), adapters=adapters, lora=lora, mode=mode,
                        batch=2, capacity=2048, attn_impl=attn, prefill_chunk=1024)
            got = []
            for agent, add, scored in draws:
                out = s.turn({0: Turn(agent, append_ids=tuple(add), score_tokens=tuple(scored)),
                              1: Turn(agent, append_ids=tuple(add[::-1]),
                                      score_tokens=tuple(scored))})
                got += [out[0].logprobs, out[1].logprobs]
            tokens = s.turn({0: Turn("plan", settings=GenerationSettings(max_new_tokens=24)),
                             1: Turn("action", settings=GenerationSettings(max_new_tokens=24))})
            scores[attn] = (np.concatenate(got), [tokens[0].token_ids, tokens[1].token_ids])
        diff = float(np.max(np.abs(scores["reference"][0] - scores[None][0])))
        same = scores["reference"][1] == scores[None][1]
        ok = diff < 0.1
        print(f"dispatched session attention, {mode.value}: max |log-prob difference| {diff:.3e} "
              f"over {scores[None][0].size} scored tokens; greedy continuation "
              f"{'identical' if same else 'differs (bf16 near-ties)'}: {'OK' if ok else 'MISMATCH'}")
        failed += not ok
    return failed


def check_long_lane() -> int:
    """Sessions with and without the packed long-prefill lane, dispatched attention, 8 rows, in
    segments of 512: after three calls (one row of 2 segments: 2 per step; a row of 3 and one of
    1: 4 per step; six rows of 1 to 3 segments: 4 per step over three steps), each
    generating one token that is then cut off again (so that a bf16 near-tie cannot make the two
    trajectories differ), the caches agree; the first tokens are reported."""
    from lragent_jax.cache import ALL_MODES
    from lragent_jax.session import GenerationSettings, Session, Turn
    from eval.common import NullTokenizer

    cfg, params, lora, adapters = _small_llama(5)
    rng = np.random.default_rng(1)
    agents = ("plan", "action", "reflect")
    def n(lo, hi):
        return int(rng.integers(lo, hi + 1))

    calls = [[n(513, 1024)] + [n(1, 60) for _ in range(7)],
             [5, n(1025, 1536), 2, n(100, 500), 9, 1, 30, 7],
             [3, n(1025, 1536), n(65, 512), n(513, 1024), 3, n(513, 1024), n(65, 512),
              n(1025, 1536)]]
    draws = [[rng.integers(3, 512, n).tolist() for n in lengths] for lengths in calls]
    failed = 0
    for mode in ALL_MODES:
        sessions = {lane: Session(cfg, params, NullTokenizer(), adapters=adapters, lora=lora,
                                  mode=mode, batch=8, capacity=4096, prefill_chunk=512,
                                  min_chunk_bucket=16, long_lane=lane) for lane in (True, False)}
        tokens, lanes = {True: [], False: []}, []
        for draw in draws:
            for lane, s in sessions.items():
                lengths = [len(s.tokens[r]) + len(ids) for r, ids in enumerate(draw)]
                out = s.turn({r: Turn(agents[r % 3], append_ids=tuple(ids),
                                      settings=GenerationSettings(max_new_tokens=1))
                              for r, ids in enumerate(draw)})
                tokens[lane].append([out[r].token_ids for r in range(8)])
                for r, n in enumerate(lengths):
                    s.truncate(r, n)
            lanes.append(sessions[True].last_long_lane)
        rel = max(float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32))
                        / max(np.linalg.norm(np.asarray(b, np.float32)), 1e-9))
                  for a, b in zip(jax.tree.leaves(sessions[True].cache.arrays),
                                  jax.tree.leaves(sessions[False].cache.arrays)))
        same = tokens[True] == tokens[False]
        ok = rel < 1e-2 and lanes == [2, 4, 4]
        print(f"long-prefill lane, {mode.value}: segments per step per call {lanes}; cache relative "
              f"difference max {rel:.2e}; first tokens "
              f"{'identical' if same else 'differ (bf16 near-ties)'}: {'OK' if ok else 'MISMATCH'}")
        failed += not ok
    return failed


if __name__ == "__main__":
    sys.exit(main())
