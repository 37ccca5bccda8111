"""Training in the shared view sees exactly what a base+low-rank shared cache gives the role."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval.teacher_forced import replay_scores
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.lora import init_adapters
from lragent_jax.model import forward_hidden, init_params, logits_from_hidden
from lragent_jax.session import Session
from lragent_jax.tasks.kb import KBTask
from lragent_jax.workflow import per_role_samples
from tests.conftest import CharTokenizer
from train.data import processing_agents, tokenize_samples

TOK = CharTokenizer()
AGENTS = ("plan", "action", "reflect")


@pytest.fixture(scope="module")
def episode():
    return KBTask(seed=5, num_train=0, num_valid=2, num_test=0).gold_episodes("valid")[0]


def test_processing_agents_follow_who_prefills(episode):
    sample = per_role_samples(episode)[4]
    agents = processing_agents(TOK.encode, sample, sample["role"], AGENTS)
    assert len(agents) == len(TOK.encode(sample["input"]))
    # the instruction and question are prefilled by the first role's turn (plan)
    first = len(TOK.encode(sample["segments"][0]))
    assert set(agents[:first]) == {AGENTS.index("plan")}
    # a role's own segment is processed by that role; env text by the next role's turn
    pos = 0
    writers = sample["writers"]
    for i, (text, writer) in enumerate(zip(sample["segments"], writers)):
        n = len(TOK.encode(text))
        if writer != "env":
            assert set(agents[pos:pos + n]) <= {AGENTS.index(writer)}
        else:
            nxt = next((w for w in writers[i + 1:] if w != "env"), sample["role"])
            assert set(agents[pos:pos + n]) <= {AGENTS.index(nxt)}
        pos += n
    # published samples carry no writers: no shared view
    assert processing_agents(TOK.encode, {"input": "x", "output": "y"}, "plan", AGENTS) is None


def test_shared_view_training_forward_equals_shared_cache_replay(episode):
    cfg = ModelConfig.tiny(vocab_size=TOK.vocab_size, eos_token_ids=(2,), num_heads=4,
                           num_kv_heads=2)
    params = init_params(jax.random.key(0), cfg)
    lora = LoraConfig(rank=4, targets=("q", "v", "o", "gate", "up", "down"))
    adapters = init_adapters(jax.random.key(1), cfg, lora, b_scale=0.2)
    total = sum(len(TOK.encode(s.text)) for s in episode.segments)
    session = Session(cfg, params, TOK, adapters=adapters, lora=lora, mode="base_lowrank_shared",
                      batch=1, capacity=1 << total.bit_length(), cache_dtype=jnp.float32,
                      prefill_chunk=256)
    scores = replay_scores(session, [episode.segments])
    samples = per_role_samples(episode)
    assert len(scores) == len(samples)
    checked = 0
    for k in (2, len(samples) - 1):  # an action turn and the last (reflect) turn
        sample, score = samples[k], scores[k]
        examples, _ = tokenize_samples({sample["role"]: [sample]}, TOK, agents=AGENTS, eos_id=2,
                                       max_len=4096, data_view="shared")
        e = examples[0]
        assert e.token_agents is not None and e.token_agents[-1] == e.agent
        hidden, _ = forward_hidden(params, jnp.asarray(e.tokens[None]), config=cfg,
                                   adapters=adapters, adapter_index=jnp.asarray(e.token_agents[None]),
                                   bake_v=False)
        logp = jax.nn.log_softmax(logits_from_hidden(params, hidden[0], cfg), axis=-1)
        n = score["tokens"]  # the output without EOS
        targets = e.tokens[e.prompt_len:e.prompt_len + n]
        got = np.asarray(logp[e.prompt_len - 1:e.prompt_len - 1 + n])[np.arange(n), targets]
        np.testing.assert_allclose(got, score["logprobs"], atol=1e-4, rtol=0)
        checked += 1
    assert checked == 2


def test_mixed_view_is_deterministic_and_about_half(episode):
    samples = {"plan": [s for s in per_role_samples(episode) if s["role"] == "plan"] * 20}
    a, _ = tokenize_samples(samples, TOK, agents=AGENTS, eos_id=2, max_len=8192, data_view="mixed",
                            seed=3)
    b, _ = tokenize_samples(samples, TOK, agents=AGENTS, eos_id=2, max_len=8192, data_view="mixed",
                            seed=3)
    shared = [e.token_agents is not None for e in a]
    assert shared == [e.token_agents is not None for e in b]
    assert 0.25 < np.mean(shared) < 0.75
    with pytest.raises(ValueError, match="view must be one of"):
        tokenize_samples(samples, TOK, agents=AGENTS, eos_id=2, max_len=8192, data_view="both")


def test_training_in_the_mixed_view_runs_and_learns():
    from tests.test_train_toys import tiny_base, toy_samples
    from train.loop import RunOptions, TrainConfig, train

    def with_writers(samples):
        for role, items in samples.items():
            for s in items:
                s["writers"] = ["env"] * len(s["segments"])
        return samples

    config = TrainConfig(epochs=1, batch_size=8, max_len=32, bucket_multiple=32,
                         learning_rate=1e-2, warmup_steps=1, data_view="mixed")
    result = train(config, tiny_base(), with_writers(toy_samples(48)), toy_samples(8, offset=500),
                   RunOptions(progress=False, plot=False))
    losses = [r["loss"] for r in result.history]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("heads,kv_heads,head_dim,rank,per_token", [
    (4, 2, 16, 4, True), (3, 1, 24, 5, True), (6, 6, 8, 3, False)])
def test_factored_dense_attention_matches_reference(heads, kv_heads, head_dim, rank, per_token):
    # the fused path of shared-view training ([V | C | 0] values through one dense attention call)
    # against the plain-JAX Flash-LoRA-Attention reference, values and gradients, random inputs
    from lragent_jax.model import factored_dense_attention
    from pallas_kernels.flash_lora_attention import flash_lora_attention

    rng = np.random.default_rng([heads, head_dim, rank])
    batch, length, agents = 3, 13, 3
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [
        (batch, length, heads, head_dim), (batch, length, kv_heads, head_dim),
        (batch, length, kv_heads, head_dim)])
    lowrank = jnp.asarray(rng.standard_normal((batch, length, rank)), jnp.float32)
    lora_b = jnp.asarray(rng.standard_normal((agents, kv_heads, rank, head_dim)), jnp.float32)
    shape = (batch, length) if per_token else (batch,)
    index = jnp.asarray(rng.integers(-1, agents, size=shape), jnp.int32)
    lengths = jnp.full((batch,), length, jnp.int32)

    def ours(q, v, lowrank, lora_b):
        return factored_dense_attention(q, k, v, lowrank, lora_b, index, implementation="xla")

    def reference(q, v, lowrank, lora_b):
        return flash_lora_attention(q, k, v, lowrank, lora_b, index, kv_lengths=lengths,
                                    q_offset=jnp.zeros((batch,), jnp.int32),
                                    implementation="reference")

    np.testing.assert_allclose(ours(q, v, lowrank, lora_b), reference(q, v, lowrank, lora_b),
                               rtol=2e-5, atol=2e-5)
    weights = jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), jnp.float32)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2, 3))(
        q, v, lowrank, lora_b) for f in (ours, reference)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
