"""The Llama-family forward against an independent float64 numpy implementation; adapters; cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lragent_jax.config import LoraConfig, ModelConfig, RopeScaling
from lragent_jax.lora import (count_parameters, expected_parameter_count, init_adapters,
                              merge_adapter)
from lragent_jax.model import forward, init_params
from lragent_jax.pretrained import Model
from lragent_jax.session import CapacityError, GenerationSettings, Session, Turn
from tests.conftest import CharTokenizer
from tests.numpy_llama import llama_forward

_forward = jax.jit(forward, static_argnames=("config",))

VARIANTS = {
    "mha_g1": dict(num_heads=4, num_kv_heads=4),
    "gqa_g3_qkv_bias": dict(num_heads=6, num_kv_heads=2, qkv_bias=True),
    "gqa_g4_untied": dict(num_heads=8, num_kv_heads=2, tie_embeddings=False),
    "gqa_g8_llama3_rope": dict(num_heads=8, num_kv_heads=1, rope_theta=500000.0,
                               rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 32)),
    "linear_rope_tied": dict(num_heads=4, num_kv_heads=2, tie_embeddings=True,
                             rope_scaling=RopeScaling("linear", 2.0)),
}


def _rel_err(got, ref):
    got = np.asarray(got, np.float64)
    return np.linalg.norm(got - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_float64_numpy_reference(variant):
    cfg = ModelConfig.tiny(**VARIANTS[variant])
    seed = sorted(VARIANTS).index(variant)
    params = init_params(jax.random.key(seed), cfg)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 13))
    logits = _forward(params, jnp.asarray(tokens), config=cfg)
    for row in range(2):
        assert _rel_err(logits[row], llama_forward(params, cfg, tokens[row])) <= 1e-5


@pytest.mark.parametrize("shared_a", [True, False])
def test_adapter_logits_match_reference_and_merged_weights(shared_a):
    cfg = ModelConfig.tiny(num_heads=6, num_kv_heads=2, qkv_bias=True)
    params = init_params(jax.random.key(0), cfg)
    lora = LoraConfig(rank=4, targets=("q", "k", "v", "o", "gate", "up", "down"), shared_a=shared_a)
    adapters = init_adapters(jax.random.key(1), cfg, lora, b_scale=0.2)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 9))
    index = jnp.asarray([2, -1, 0])  # a mixed batch: reflect, bare base model, plan
    mixed = _forward(params, jnp.asarray(tokens), config=cfg, adapters=adapters,
                     adapter_index=index)
    for row, agent in enumerate([2, -1, 0]):
        ref = llama_forward(params, cfg, tokens[row], adapters, agent)
        assert _rel_err(mixed[row], ref) <= 1e-5
        merged = params if agent < 0 else merge_adapter(params, adapters, agent)
        alone = _forward(merged, jnp.asarray(tokens[row:row + 1]), config=cfg)
        np.testing.assert_allclose(mixed[row], alone[0], atol=2e-5, rtol=1e-5)
    # the adapters do change the output
    assert _rel_err(mixed[0], llama_forward(params, cfg, tokens[0])) > 1e-3


def test_adapter_parameter_counts():
    cfg = ModelConfig.smollm2_135m()
    for targets in [("q", "v"), ("q", "v", "o", "gate", "up", "down")]:
        shared = LoraConfig(rank=8, targets=targets, shared_a=True)
        independent = shared.replace(shared_a=False)
        n_shared = count_parameters(jax.eval_shape(lambda: init_adapters(
            jax.random.key(0), cfg, shared)))
        n_indep = count_parameters(jax.eval_shape(lambda: init_adapters(
            jax.random.key(0), cfg, independent)))
        a = sum(cfg.num_layers * cfg.module_dims(m)[0] * 8 for m in targets)
        b = sum(cfg.num_layers * 8 * cfg.module_dims(m)[1] for m in targets)
        assert n_shared == a + 3 * b == expected_parameter_count(cfg, shared)
        assert n_indep == 3 * (a + b) == expected_parameter_count(cfg, independent)
    # |A| == |B| (square modules): shared-A has exactly 1/3 fewer parameters with 3 agents
    square = LoraConfig(rank=8, targets=("q", "o"))
    tiny = ModelConfig.tiny(num_heads=4, num_kv_heads=4, head_dim=12, hidden_size=48)
    ratio = expected_parameter_count(tiny, square) / expected_parameter_count(
        tiny, square.replace(shared_a=False))
    assert ratio == pytest.approx(2 / 3)


def test_lora_config_errors():
    with pytest.raises(ValueError, match="rank must be a positive int; got 0"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="rank must be a positive int; got -2"):
        LoraConfig(rank=-2)
    with pytest.raises(ValueError, match=r"unknown adapter target\(s\) \['qkv'\]"):
        LoraConfig(targets=("q", "qkv"))
    with pytest.raises(ValueError, match="agent names must be distinct"):
        LoraConfig(agents=("plan", "plan"))
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        ModelConfig.tiny(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        ModelConfig.preset("gpt5")
    with pytest.raises(ValueError, match="unknown architecture"):
        ModelConfig.from_hf_dict({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def _tiny_model(**kw):
    tok = CharTokenizer()
    cfg = ModelConfig.tiny(vocab_size=tok.vocab_size, eos_token_ids=(), **kw)
    return Model(config=cfg, params=init_params(jax.random.key(3), cfg), tokenizer=tok)


def test_cached_generation_equals_full_recomputation():
    model = _tiny_model(num_heads=6, num_kv_heads=2)
    prompts = ["Hello there, how", "A much longer prompt than the first one!", "x"]
    n_new = 12
    outs = model.generate(prompts, max_new_tokens=n_new)
    for prompt, out in zip(prompts, outs):
        ids = model.tokenizer.encode(prompt)
        for _ in range(n_new):
            logits = model.logits([ids])
            ids.append(int(jnp.argmax(logits[0, -1])))
        assert out == model.tokenizer.decode(ids[-n_new:])
    # logits through the cache (teacher-forced turn) equal a full forward within 1e-4
    session = Session(model.config, model.params, model.tokenizer, mode="non_shared",
                      batch=2, capacity=128, cache_dtype=jnp.float32)
    session.append_text(0, prompts[1])
    session.append_text(1, prompts[0])
    session.turn({0: Turn(None, settings=GenerationSettings(max_new_tokens=5)),
                  1: Turn(None, settings=GenerationSettings(max_new_tokens=9))})
    target = model.tokenizer.encode(" and more text")
    res = session.turn({0: Turn(None, append=" ;", score_tokens=tuple(target)),
                        1: Turn(None, append=" ;", score_tokens=tuple(target))})
    for row in (0, 1):
        full = session.tokens[row]
        logp = jax.nn.log_softmax(model.logits([full])[0], axis=-1)
        n = len(target)
        expect = np.asarray(logp[len(full) - n - 1:len(full) - 1])[np.arange(n), target]
        np.testing.assert_allclose(res[row].logprobs, expect, atol=1e-4, rtol=0)


def test_sampling_is_reproducible_and_respects_top_k():
    model = _tiny_model()
    a = model.generate("Seeded", max_new_tokens=10, temperature=1.0, seed=7)
    b = model.generate("Seeded", max_new_tokens=10, temperature=1.0, seed=7)
    c = model.generate("Seeded", max_new_tokens=10, temperature=1.0, seed=8)
    greedy = model.generate("Seeded", max_new_tokens=10)
    assert a == b and len(a) == 10
    assert a != c or a != greedy
    # top_k=1 is greedy whatever the temperature
    assert model.generate("Seeded", max_new_tokens=10, temperature=2.0, top_k=1, seed=3) == greedy
    # a tiny top_p keeps only the most likely token: greedy as well
    assert model.generate("Seeded", max_new_tokens=10, temperature=1.0, top_p=1e-6,
                          seed=4) == greedy


def test_stop_tokens_end_generation():
    model = _tiny_model()
    free = model.generate("Stop me", max_new_tokens=12)
    stop_char = free[4]
    cut = model.generate("Stop me", max_new_tokens=12, stop=(stop_char,))
    assert cut == free[:free.index(stop_char)]


def test_generation_input_errors():
    model = _tiny_model()
    with pytest.raises(ValueError, match="does not fit the cache capacity 64"):
        model.generate("x" * 60, max_new_tokens=10, capacity=64)
    session = Session(model.config, model.params, model.tokenizer, mode="non_shared", batch=1,
                      capacity=32)
    with pytest.raises(CapacityError, match="exceed the cache capacity 32"):
        session.append_text(0, "y" * 33)
    with pytest.raises(ValueError, match="agent .plan. given but (the model|this session) has no adapters"):
        model.generate("hi", agent="plan")
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        model.generate("hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate("hi", temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match=r"token ids \[500\] out of range for vocab size"):
        model.logits([[1, 2, 500]])
    lora = LoraConfig(rank=2, targets=("q",))
    adapters = init_adapters(jax.random.key(0), model.config, lora)
    tuned = model.with_adapters(adapters, lora)
    with pytest.raises(ValueError, match="agent index 5 out of range; allowed: 0..2"):
        tuned.generate("hi", agent=5)
    with pytest.raises(ValueError, match="unknown agent 'critic'"):
        tuned.generate("hi", agent="critic")
    bad = {"q": {"a": adapters["q"]["a"][:, :, :1], "b": adapters["q"]["b"]}}
    with pytest.raises(ValueError, match=r"adapters\['q'\]\['a'\] has shape"):
        model.with_adapters(bad, lora)
