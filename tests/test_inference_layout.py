"""The per-layer inference layout against the stacked training layout, and the session's turn
contract built on it: per-row seeds, blocked decode, all-or-nothing turns, argument checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lragent_jax import inference
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.generate import _filter_threshold_sorted, filter_threshold
from lragent_jax.lora import init_adapters
from lragent_jax.model import forward, init_params
from lragent_jax.session import CapacityError, GenerationSettings, Session, Turn
from tests.conftest import CharTokenizer

TOK = CharTokenizer()


def _tiny(**overrides):
    fields = dict(vocab_size=TOK.vocab_size, eos_token_ids=())
    fields.update(overrides)
    return ModelConfig.tiny(**fields)


@pytest.mark.parametrize("overrides,shards,shared_a", [
    ({}, 1, True),
    ({"qkv_bias": True, "tie_embeddings": True}, 2, False),
    ({"num_heads": 6, "num_kv_heads": 3, "intermediate_size": 66}, 3, True),
])
def test_inference_layout_gives_the_training_layout_logits(overrides, shards, shared_a):
    cfg = _tiny(**overrides)
    stacked = init_params(jax.random.key(3), cfg)
    lora = LoraConfig(rank=4, targets=("q", "k", "v", "o", "gate", "up", "down"),
                      shared_a=shared_a)
    adapters = init_adapters(jax.random.key(4), cfg, lora, b_scale=0.3)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (3, 21)), jnp.int32)
    lengths = jnp.asarray([21, 9, 14], jnp.int32)
    per_row = jnp.asarray([0, 2, -1], jnp.int32)
    per_token = jnp.asarray(rng.integers(-1, 3, (3, 21)), jnp.int32)
    converted = inference.to_inference_params(stacked, cfg, shards=shards)
    assert inference.is_inference_layout(converted)
    assert converted["layers"][0]["qkv"].shape[1] == shards
    for index in (per_row, per_token):
        want = forward(stacked, tokens, config=cfg, adapters=adapters, adapter_index=index,
                       lengths=lengths)
        got = forward(converted, tokens, config=cfg, adapters=adapters, adapter_index=index,
                      lengths=lengths, lora=lora)
        for row, n in enumerate(np.asarray(lengths)):
            np.testing.assert_allclose(np.asarray(got[row, :n]), np.asarray(want[row, :n]),
                                       rtol=2e-4, atol=2e-4)
    plain = forward(stacked, tokens, config=cfg)
    np.testing.assert_allclose(np.asarray(forward(converted, tokens, config=cfg)),
                               np.asarray(plain), rtol=2e-4, atol=2e-4)
    back = inference.to_training_params(converted, cfg)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_shard_count_is_refused():
    cfg = _tiny()
    with pytest.raises(ValueError, match="shards=3 must be a positive int dividing"):
        inference.to_inference_params(init_params(jax.random.key(0), cfg), cfg, shards=3)


def test_conversion_with_donation_never_holds_two_copies(monkeypatch):
    cfg = _tiny(num_layers=3, intermediate_size=192)
    stacked = init_params(jax.random.key(1), cfg)
    total = sum(x.nbytes for x in jax.tree.leaves(stacked))
    groups = {"qkv": sum(stacked["layers"][n].nbytes for n in "qkv"),
              "gate_up": stacked["layers"]["gate"].nbytes + stacked["layers"]["up"].nbytes}
    baseline = sum(x.nbytes for x in jax.live_arrays()) - total
    seen = []
    for name in ("_split", "_split_qkv", "_split_gate_up"):
        original = getattr(inference, name)

        def recording(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            seen.append(sum(x.nbytes for x in jax.live_arrays()) - baseline)
            return out

        monkeypatch.setattr(inference, name, recording)
    converted = inference.to_inference_params(stacked, cfg, donate=True)
    assert all(x.is_deleted() for x in jax.tree.leaves(stacked["layers"]))
    assert max(seen) <= total + max(groups.values())
    live = sum(x.nbytes for x in jax.live_arrays()) - baseline
    assert live == sum(x.nbytes for x in jax.tree.leaves(converted)) == total


# ----------------------------------------------------------------------------- the session


@pytest.fixture(scope="module")
def model():
    cfg = _tiny()
    params = inference.to_inference_params(init_params(jax.random.key(0), cfg), cfg)
    lora = LoraConfig(rank=4, targets=("q", "v", "o", "down"))
    return cfg, params, lora, init_adapters(jax.random.key(1), cfg, lora, b_scale=0.3)


def _session(model, batch=1, **kw):
    cfg, params, lora, adapters = model
    kw.setdefault("mode", "base_lowrank_shared")
    return Session(cfg, params, TOK, adapters=adapters, lora=lora, batch=batch, capacity=128,
                   cache_dtype=jnp.float32, prefill_chunk=32, min_chunk_bucket=32,
                   min_new_bucket=16, **kw)


SAMPLED = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1234)


def test_a_seeded_row_samples_the_same_tokens_in_any_row_or_batch(model):
    alone = _session(model)
    alone.append_text(0, "Question: where?\n")
    want = alone.turn({0: Turn("plan", append="T:", settings=SAMPLED)})[0].token_ids
    crowd = _session(model, batch=3, seed=99)
    for row in range(3):
        crowd.append_text(row, "Question: where?\n" if row == 2 else f"Other {row} prompt\n")
    got = crowd.turn({0: Turn("action", append="x", settings=GenerationSettings(
                          max_new_tokens=5, temperature=0.8)),
                      1: Turn("plan", append="y", settings=SAMPLED),
                      2: Turn("plan", append="T:", settings=SAMPLED)})
    assert got[2].token_ids == want
    unseeded = _session(model, batch=1, seed=5)
    unseeded.append_text(0, "Question: where?\n")
    settings = GenerationSettings(max_new_tokens=12, temperature=1.0)
    again = _session(model, batch=1, seed=5)
    again.append_text(0, "Question: where?\n")
    assert (unseeded.turn({0: Turn("plan", settings=settings)})[0].token_ids
            == again.turn({0: Turn("plan", settings=settings)})[0].token_ids)


@pytest.mark.parametrize("settings", [
    GenerationSettings(max_new_tokens=13, stop=("e",)),
    GenerationSettings(max_new_tokens=9, temperature=0.9, seed=7),
], ids=["greedy-stop", "sampled"])
def test_blocked_decode_keeps_the_tokens_of_a_per_token_check(model, settings):
    outs = []
    for block in (1, 4, 16):
        s = _session(model, batch=2, decode_block=block)
        s.append_text(0, "Plan the trip.\n")
        s.append_text(1, "Short\n")
        res = s.turn({0: Turn("plan", settings=settings),
                      1: Turn("reflect", settings=GenerationSettings(max_new_tokens=3))})
        outs.append(([r.token_ids for r in res.values()], [list(t) for t in s.tokens],
                     s.processed.tolist(), s.filled.tolist()))
    assert outs[0] == outs[1] == outs[2]


def test_filter_threshold_matches_the_full_sort():
    rng = np.random.default_rng(0)
    for scale in (8.0, 0.01):  # peaked (fast path) and flat (nucleus past the candidates)
        logits = jnp.asarray(rng.standard_normal((4, 300)) * scale, jnp.float32)
        top_p = jnp.asarray([0.5, 0.9, 1.0, 0.99], jnp.float32)
        for top_k in ([0, 0, 0, 0], [5, 0, 3, 80]):
            k = jnp.asarray(top_k, jnp.int32)
            np.testing.assert_array_equal(np.asarray(filter_threshold(logits, top_p, k)),
                                          np.asarray(_filter_threshold_sorted(logits, top_p, k)))


def test_a_failing_turn_changes_nothing(model):
    s = _session(model, batch=2)
    s.append_text(0, "Hello there\n")
    s.append_text(1, "x" * 100)
    before = ([list(t) for t in s.tokens], s.processed.copy(), s.filled.copy())
    with pytest.raises(CapacityError, match="trajectory 1"):
        s.turn({0: Turn("plan", append="ok", settings=GenerationSettings(max_new_tokens=4)),
                1: Turn("plan", append="y" * 20, settings=GenerationSettings(max_new_tokens=20))})
    assert [list(t) for t in s.tokens] == before[0]
    assert (s.processed == before[1]).all() and (s.filled == before[2]).all()


def test_a_failure_inside_the_donated_call_rebuilds_the_cache(model, monkeypatch):
    import lragent_jax.session as session_module

    script = [("plan", "Question: why?\nThought:", 6), ("action", "\nAct[", 4),
              ("reflect", "]\nObs: fine\n", 5)]

    def run(fail_at=None):
        s = _session(model)
        s.append_text(0, "You are an agent.\n")
        outs = []
        for i, (agent, text, n) in enumerate(script):
            turn = {0: Turn(agent, append=text, settings=GenerationSettings(max_new_tokens=n))}
            if i == fail_at:
                real = session_module.run_turn

                def consume_then_fail(params, adapters, cache, inputs, *, shape):
                    for leaf in jax.tree.leaves(cache):
                        leaf.delete()  # what a failure after donation leaves behind
                    raise RuntimeError("RESOURCE_EXHAUSTED: injected")

                monkeypatch.setattr(session_module, "run_turn", consume_then_fail)
                tokens_before = list(s.tokens[0])
                with pytest.raises(RuntimeError, match="injected"):
                    s.turn(turn)
                monkeypatch.setattr(session_module, "run_turn", real)
                assert s.tokens[0] == tokens_before
                assert s.filled.tolist() == [0] and s.processed.tolist() == [[0, 0, 0]]
                assert not any(x.is_deleted() for x in jax.tree.leaves(s.cache))
            outs.append(s.turn(turn)[0].token_ids)
        return outs, s.tokens[0]

    assert run(fail_at=1) == run()


def test_session_arguments_are_checked_in_the_constructor(model):
    cfg, params, lora, adapters = model
    with pytest.raises(ValueError, match="cache dtype int8 is not supported"):
        Session(cfg, params, TOK, adapters=adapters, lora=lora, cache_dtype=jnp.int8)
    with pytest.raises(ValueError, match="exceeds the model's position limit"):
        Session(cfg, params, TOK, capacity=cfg.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="unknown share mode 'shared'"):
        Session(cfg, params, TOK, mode="shared")
    with pytest.raises(ValueError, match="batch must be an int >= 1; got True"):
        Session(cfg, params, TOK, batch=True)
    with pytest.raises(ValueError, match="decode_block must be an int >= 1"):
        Session(cfg, params, TOK, decode_block=0)
    with pytest.raises(ValueError, match="attn_impl='tritonn'"):
        Session(cfg, params, TOK, attn_impl="tritonn")


def test_turn_arguments_are_checked(model):
    s = _session(model)
    s.append_text(0, "abc")
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            GenerationSettings(temperature=bad)
    with pytest.raises(ValueError, match="top_p must be in"):
        GenerationSettings(top_p=float("nan"))
    with pytest.raises(ValueError, match="not one string"):
        GenerationSettings(stop="\n")
    with pytest.raises(ValueError, match="seed must be None or an int"):
        GenerationSettings(seed=-1)
    with pytest.raises(ValueError, match="truncate length must be an int in 0..3; got -1"):
        s.truncate(0, -1)
    assert s.tokens[0] == TOK.encode("abc")
    out = s.turn({np.int64(0): Turn(np.int64(1), settings=GenerationSettings(max_new_tokens=2))})
    assert set(out) == {0}
    with pytest.raises(ValueError, match="agent must be a name, an index or None; got True"):
        s.turn({0: Turn(True)})
    with pytest.raises(ValueError, match="trajectory 5 out of range"):
        s.turn({5: Turn("plan")})


@pytest.mark.parametrize("shared_a", [True, False])
def test_fused_adapter_columns_give_the_same_logits(shared_a):
    cfg = _tiny()
    stacked = init_params(jax.random.key(5), cfg)
    lora = LoraConfig(rank=4, targets=("q", "v", "o", "gate", "up", "down"), shared_a=shared_a)
    adapters = init_adapters(jax.random.key(6), cfg, lora, b_scale=0.3)
    bare = inference.to_inference_params(stacked, cfg)
    fused = inference.fuse_adapters(bare, cfg, adapters, lora)
    assert inference.fused_groups(fused, cfg) == {"qkv", "o", "gate_up", "down"}
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (3, 17)), jnp.int32)
    index = jnp.asarray([1, -1, 2], jnp.int32)
    want = forward(stacked, tokens, config=cfg, adapters=adapters, adapter_index=index)
    got = forward(fused, tokens, config=cfg, adapters=adapters, adapter_index=index, lora=lora)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
    # the bare model ignores the appended columns; stripping them gives the bare weights back
    np.testing.assert_allclose(np.asarray(forward(fused, tokens, config=cfg)),
                               np.asarray(forward(stacked, tokens, config=cfg)), rtol=2e-4,
                               atol=2e-4)
    for a, b in zip(jax.tree.leaves(inference.unfuse_adapters(fused, cfg)), jax.tree.leaves(bare)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = init_adapters(jax.random.key(7), cfg, lora, b_scale=0.3)
    with pytest.raises(ValueError, match="carry the A matrices of other adapters"):
        Session(cfg, fused, TOK, adapters=other, lora=lora, mode="base_shared")
    refused = LoraConfig(rank=2, targets=("q", "v"), shared_a=shared_a)
    with pytest.raises(ValueError, match="other adapters"):
        Session(cfg, fused, TOK, adapters=init_adapters(jax.random.key(8), cfg, refused),
                lora=refused, mode="base_shared")


@pytest.mark.parametrize("shards", [1, 2])
def test_the_weights_fingerprint_reads_the_inference_layout_as_the_stacked_one(shards):
    from lragent_jax.adapters_io import weights_fingerprint

    cfg = _tiny(qkv_bias=True)
    stacked = init_params(jax.random.key(9), cfg)
    lora = LoraConfig(rank=4, targets=("q", "v", "o", "gate", "up", "down"))
    adapters = init_adapters(jax.random.key(10), cfg, lora, b_scale=0.1)
    converted = inference.to_inference_params(stacked, cfg, shards=shards)
    fused = inference.fuse_adapters(converted, cfg, adapters, lora)
    want = weights_fingerprint(stacked)
    assert weights_fingerprint(converted, cfg) == want
    assert weights_fingerprint(fused, cfg) == want
    with pytest.raises(ValueError, match="needs their ModelConfig"):
        weights_fingerprint(converted)


def test_the_stop_mask_cache_is_bounded(model, monkeypatch):
    import lragent_jax.session as session_module

    monkeypatch.setattr(session_module, "STOP_MASK_CACHE", 3)
    s = _session(model)
    for i in range(6):
        s._stop_mask(GenerationSettings(stop=(f"stop{i}",)))
    assert len(s._stop_masks) == 3
    assert list(s._stop_masks) == [((f"stop{i}",), ()) for i in (3, 4, 5)]
    mask = s._stop_mask(GenerationSettings(stop=("stop3",)))  # a hit moves to the end
    assert list(s._stop_masks)[-1] == (("stop3",), ()) and mask.dtype == bool
