"""The four cache-sharing modes: equivalences, prefill accounting, memory, rules, mixed batches."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lragent_jax.cache import (ALL_MODES, CacheSpec, ShareMode, abstract_cache,
                               analytic_cache_bytes, measured_cache_bytes)
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.lora import init_adapters
from lragent_jax.model import forward, init_params
from lragent_jax.session import (CapacityError, GenerationSettings, Session, TokenAlignmentError,
                                 Turn)
from tests.conftest import CharTokenizer

TOK = CharTokenizer()
MODES = [m.value for m in ALL_MODES]
# plan / action / reflect turns on one trajectory: (agent, appended text, max new tokens)
SCRIPT = [("plan", "Q: find the capital.\nThought:", 6), ("plan", "\nAction:", 3),
          ("action", "[", 4), ("plan", "]\nObs: it is Paris.\nThought:", 5),
          ("reflect", "\nCheck:", 4), ("action", "\nAnswer[", 3)]


def _model(seed=0, **overrides):
    cfg = ModelConfig.tiny(vocab_size=TOK.vocab_size, eos_token_ids=(), **overrides)
    return cfg, init_params(jax.random.key(seed), cfg)


def _adapters(cfg, seed=1, targets=("q", "v", "o", "down"), shared_a=True, b_scale=0.3, rank=4):
    lora = LoraConfig(rank=rank, targets=targets, shared_a=shared_a)
    return lora, init_adapters(jax.random.key(seed), cfg, lora, b_scale=b_scale)


def _session(cfg, params, lora, adapters, mode, batch=1, capacity=256, **kw):
    # one chunk bucket and one output bucket for every turn here: few compilations
    return Session(cfg, params, TOK, adapters=adapters, lora=lora, mode=mode, batch=batch,
                   capacity=capacity, cache_dtype=jnp.float32, prefill_chunk=64,
                   min_chunk_bucket=64, **kw)


_forward = jax.jit(forward, static_argnames=("config",))


def _run_script(session, script=SCRIPT, row=0):
    log = []
    for agent, text, n in script:
        before = len(session.tokens[row])
        res = session.turn({row: Turn(agent, append=text,
                                      settings=GenerationSettings(max_new_tokens=n))})[row]
        prompt = session.tokens[row][:before] + TOK.encode(text)
        log.append((agent, prompt, res.token_ids))
    return log


def _full_logits(cfg, params, adapters, agent_index, ids, pad_to=256):
    """Logits of one sequence by a full forward without any cache (padded: one compilation)."""
    tokens = np.zeros((1, pad_to), np.int32)
    tokens[0, :len(ids)] = ids
    return _forward(params, jnp.asarray(tokens), config=cfg, adapters=adapters,
                    adapter_index=jnp.asarray([agent_index]),
                    lengths=jnp.asarray([len(ids)]))[0, :len(ids)]


def _greedy_by_recomputation(cfg, params, adapters, agent_index, prompt, n):
    ids = list(prompt)
    out = []
    for _ in range(n):
        logits = _full_logits(cfg, params, adapters, agent_index, ids)
        nxt = int(jnp.argmax(logits[-1]))
        out.append(nxt)
        ids.append(nxt)
    return out


def test_non_shared_equals_each_agent_alone():
    cfg, params = _model()
    lora, adapters = _adapters(cfg, targets=("q", "k", "v", "o", "gate", "down"))
    session = _session(cfg, params, lora, adapters, "non_shared")
    log = _run_script(session)
    for agent, prompt, generated in log:
        expect = _greedy_by_recomputation(cfg, params, adapters, lora.agent_index(agent), prompt,
                                          len(generated))
        assert generated == expect, agent
    # logits: teacher-forced scoring through the cache vs a full forward of that agent alone
    target = TOK.encode(" Paris!")
    res = session.turn({0: Turn("reflect", append="\nFinal:", score_tokens=tuple(target))})[0]
    full = session.tokens[0]
    logits = _full_logits(cfg, params, adapters, lora.agent_index("reflect"), full)
    logp = jax.nn.log_softmax(logits, axis=-1)
    n = len(target)
    expect = np.asarray(logp[len(full) - n - 1:len(full) - 1])[np.arange(n), target]
    np.testing.assert_allclose(res.logprobs, expect, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_single_agent_every_mode_matches_non_shared(mode):
    cfg, params = _model(seed=3)
    lora, adapters = _adapters(cfg, seed=4)
    lora1 = lora.replace(agents=("solo",))
    adapters1 = {m: {"a": x["a"], "b": x["b"][:, :1]} for m, x in adapters.items()}
    script = [("solo", t, n) for _, t, n in SCRIPT]
    ref = _run_script(_session(cfg, params, lora1, adapters1, "non_shared"), script)
    got = _run_script(_session(cfg, params, lora1, adapters1, mode), script)
    assert [g for _, _, g in got] == [g for _, _, g in ref]


@pytest.mark.parametrize("mode", MODES)
def test_zero_b_every_mode_equals_base_model(mode):
    cfg, params = _model(seed=5)
    lora, adapters = _adapters(cfg, seed=6, b_scale=0.0)
    got = _run_script(_session(cfg, params, lora, adapters, mode))
    for _, prompt, generated in got:
        assert generated == _greedy_by_recomputation(cfg, params, None, -1, prompt, len(generated))


def _expected_prefill(mode, script_log, final_len):
    """Tokens each agent must prefill, derived from METHOD.md's table, independent of the session."""
    mode = ShareMode(mode)
    counts = {"plan": 0, "action": 0, "reflect": 0}
    seen = {a: 0 for a in counts}  # per-agent processed length (per-agent views)
    filled = 0  # shared processed length
    for agent, prompt, generated in script_log:
        start = seen[agent] if mode.per_agent_view else filled
        start = min(start, len(prompt) - 1)
        counts[agent] += len(prompt) - start
        end = len(prompt) + len(generated) - 1  # the last generated token is not fed
        seen[agent] = end
        filled = end
    return counts


@pytest.mark.parametrize("mode", MODES)
def test_prefill_counts_follow_the_method(mode):
    cfg, params = _model(seed=7)
    lora, adapters = _adapters(cfg, seed=8)
    session = _session(cfg, params, lora, adapters, mode)
    log = _run_script(session)
    counts = session.prefill_counts()
    assert counts == _expected_prefill(mode, log, len(session.tokens[0]))
    fed_total = len(session.tokens[0]) - 1
    decoded_fed = sum(len(g) - 1 for _, _, g in log)
    if mode in ("base_lowrank_shared", "fully_shared"):
        # every token is computed once: by a prefill or by the decode step that wrote it
        assert sum(counts.values()) + decoded_fed == fed_total
    else:
        # another agent's tokens are prefilled again: strictly more than once in total
        assert sum(counts.values()) + decoded_fed > fed_total


@pytest.mark.parametrize("mode", MODES)
def test_measured_bytes_equal_analytic(mode):
    cfg, params = _model()
    lora, adapters = _adapters(cfg)
    session = _session(cfg, params, lora, adapters, mode, batch=2, capacity=100)
    assert session.cache_bytes() == session.analytic_cache_bytes()


def test_llama8b_memory_ratio_without_allocating():
    cfg = ModelConfig.llama3_1_8b()
    lora = LoraConfig(rank=8, targets=("q", "v"))
    sizes = {}
    for mode in MODES:
        spec = CacheSpec.create(cfg, mode, num_agents=3, batch=1, capacity=32768, lora=lora)
        measured = measured_cache_bytes(abstract_cache(spec))
        analytic = analytic_cache_bytes(cfg, mode, num_agents=3, capacity=32768, rank=8)
        assert measured == analytic
        sizes[mode] = measured["total"]
    ratio = sizes["base_lowrank_shared"] / sizes["non_shared"]
    assert ratio <= 0.34
    assert abs(ratio - (2 * 8 * 128 + 8) / (3 * 2 * 8 * 128)) < 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_mixed_batch_equals_rows_one_at_a_time(mode):
    cfg, params = _model(seed=9)
    lora, adapters = _adapters(cfg, seed=10)
    prompts = ["First question?\n", "Another, longer trajectory here.\n", "Third\n"]
    agents = [["plan", "action", "reflect"], ["reflect", "plan", "plan"], ["action", None, "plan"]]
    appends = ["Thought:", "\nAction[", "]\nObs: ok\n"]
    batched = _session(cfg, params, lora, adapters, mode, batch=3)
    for row, p in enumerate(prompts):
        batched.append_text(row, p)
    for step in range(3):
        batched.turn({row: Turn(agents[row][step], append=appends[step],
                                settings=GenerationSettings(max_new_tokens=4 + row))
                      for row in range(3)})
    for row, p in enumerate(prompts):
        single = _session(cfg, params, lora, adapters, mode)
        single.append_text(0, p)
        for step in range(3):
            single.turn({0: Turn(agents[row][step], append=appends[step],
                                 settings=GenerationSettings(max_new_tokens=4 + row))})
        assert single.tokens[0] == batched.tokens[row]


def test_k_adapters_refused_in_shared_modes():
    cfg, params = _model()
    lora, adapters = _adapters(cfg, targets=("q", "k", "v"))
    _session(cfg, params, lora, adapters, "non_shared")  # allowed
    for mode in ("fully_shared", "base_shared", "base_lowrank_shared"):
        with pytest.raises(ValueError, match="adapters on k are refused"):
            _session(cfg, params, lora, adapters, mode)


def test_base_lowrank_shared_refuses_differing_a():
    cfg, params = _model()
    lora, adapters = _adapters(cfg, shared_a=False)
    with pytest.raises(ValueError, match="A matrices are identical"):
        _session(cfg, params, lora, adapters, "base_lowrank_shared")
    _session(cfg, params, lora, adapters, "base_shared")  # allowed: one low-rank cache per agent
    # per-agent A that happen to be identical are accepted (checked on values)
    same = {m: {"a": jnp.repeat(x["a"][:, :1], 3, axis=1), "b": x["b"]} for m, x in adapters.items()}
    _session(cfg, params, lora, same, "base_lowrank_shared")


@pytest.mark.parametrize("mode", MODES)
def test_capacity_error_names_trajectory_and_corrupts_nothing(mode):
    cfg, params = _model()
    lora, adapters = _adapters(cfg)
    session = _session(cfg, params, lora, adapters, mode, batch=2, capacity=40)
    session.append_text(1, "0123456789")
    session.turn({1: Turn("plan", settings=GenerationSettings(max_new_tokens=4))})
    tokens = [list(t) for t in session.tokens]
    state = (session.processed.copy(), session.filled.copy())
    with pytest.raises(CapacityError, match=r"trajectory 1: length 3\d plus up to 8 new tokens "
                                            r"exceeds the cache capacity 40"):
        session.turn({1: Turn("action", append="x" * 20,
                              settings=GenerationSettings(max_new_tokens=8))})
    assert session.tokens == tokens
    assert (session.processed == state[0]).all() and (session.filled == state[1]).all()
    # the session still works and gives the same result as a fresh one
    out = session.turn({1: Turn("action", append="ab", settings=GenerationSettings(
        max_new_tokens=3))})[1]
    fresh = _session(cfg, params, lora, adapters, mode, batch=2, capacity=40)
    fresh.append_text(1, "0123456789")
    fresh.turn({1: Turn("plan", settings=GenerationSettings(max_new_tokens=4))})
    assert fresh.turn({1: Turn("action", append="ab", settings=GenerationSettings(
        max_new_tokens=3))})[1].token_ids == out.token_ids


def test_extend_text_checks_token_prefix():
    class MergingTokenizer(CharTokenizer):
        """Like CharTokenizer, but "ab" is one token: appending "b" after "a" re-tokenizes."""

        vocab_size = CharTokenizer.vocab_size + 1

        def encode(self, text, add_bos=False):
            ids, i = [], 0
            while i < len(text):
                if text.startswith("ab", i):
                    ids.append(self.vocab_size - 1)
                    i += 2
                else:
                    ids.extend(super().encode(text[i]))
                    i += 1
            return ids

        def decode(self, ids, skip_special_tokens=False):
            return "".join("ab" if i == self.vocab_size - 1 else super(MergingTokenizer, self)
                           .decode([i]) for i in ids)

    tok = MergingTokenizer()
    cfg = ModelConfig.tiny(vocab_size=tok.vocab_size)
    session = Session(cfg, init_params(jax.random.key(0), cfg), tok, batch=1, capacity=64,
                      mode="non_shared")
    session.extend_text(0, "xa")
    session.extend_text(0, "xa cab")  # the cached tokens are a prefix: fine
    assert session.tokens[0][-1] == tok.vocab_size - 1
    session2 = Session(cfg, init_params(jax.random.key(0), cfg), tok, batch=1, capacity=64,
                       mode="non_shared")
    session2.extend_text(0, "xa")
    with pytest.raises(TokenAlignmentError, match="first difference at token 1"):
        session2.extend_text(0, "xab")  # "a" + "b" would merge into the "ab" token


def test_stop_string_cuts_output_and_rolls_back_the_cache():
    cfg, params = _model(seed=11)
    lora, adapters = _adapters(cfg, seed=12)
    # find what the model generates, then stop on a character inside it
    probe = _session(cfg, params, lora, adapters, "base_lowrank_shared")
    probe.append_text(0, "Stop test:")
    text = probe.turn({0: Turn("plan", settings=GenerationSettings(max_new_tokens=8))})[0].text
    stop = text[3]
    session = _session(cfg, params, lora, adapters, "base_lowrank_shared")
    session.append_text(0, "Stop test:")
    res = session.turn({0: Turn("plan", settings=GenerationSettings(max_new_tokens=8,
                                                                      stop=(stop,)))})[0]
    assert res.text == text[:text.index(stop)] and res.stop_reason == "stop"
    assert TOK.decode(session.tokens[0]) == "Stop test:" + res.text
    assert session.filled[0] <= len(session.tokens[0])
    # continuing after the cut equals a fresh session given the same text
    kept = list(session.tokens[0])
    nxt = session.turn({0: Turn("action", append="|", settings=GenerationSettings(
        max_new_tokens=5))})[0]
    # the same history written by the same agents (plan's output teacher-forced)
    fresh = _session(cfg, params, lora, adapters, "base_lowrank_shared")
    fresh.append_text(0, "Stop test:")
    fresh.turn({0: Turn("plan", score_tokens=tuple(kept[len(TOK.encode("Stop test:")):]))})
    assert fresh.tokens[0] == kept
    assert fresh.turn({0: Turn("action", append="|", settings=GenerationSettings(
        max_new_tokens=5))})[0].token_ids == nxt.token_ids


def test_bad_agent_and_mode_errors():
    cfg, params = _model()
    lora, adapters = _adapters(cfg)
    with pytest.raises(ValueError, match="unknown share mode 'half_shared'"):
        _session(cfg, params, lora, adapters, "half_shared")
    session = _session(cfg, params, lora, adapters, "non_shared")
    session.append_text(0, "hi")
    with pytest.raises(ValueError, match="unknown agent 'critic'"):
        session.turn({0: Turn("critic")})
    with pytest.raises(ValueError, match="agent index 3 out of range"):
        session.turn({0: Turn(3)})
    with pytest.raises(ValueError, match="trajectory 5 out of range"):
        session.turn({5: Turn("plan")})


def forward_with_processors(params, cfg, adapters, ids, processors, bake_v):
    """Cache-free logits of one sequence whose token i goes through agent ``processors[i]``."""
    from lragent_jax.model import forward_hidden, logits_from_hidden

    hidden, _ = forward_hidden(params, jnp.asarray([ids]), config=cfg, adapters=adapters,
                               adapter_index=jnp.asarray([processors]), bake_v=bake_v)
    return logits_from_hidden(params, hidden, cfg)[0]


@pytest.mark.parametrize("mode", ["fully_shared", "base_lowrank_shared"])
def test_shared_cache_equals_one_pass_with_each_tokens_processor(mode):
    """An independent check of the shared modes: a cache built turn by turn holds exactly what one
    cache-free forward computes when every token goes through the agent that prefilled it (writer's
    B baked into V for fully_shared; each query's own B on the shared low-rank values for
    base_lowrank_shared)."""
    cfg, params = _model(seed=13)
    lora, adapters = _adapters(cfg, seed=14, targets=("q", "v", "o", "gate", "down"))
    session = _session(cfg, params, lora, adapters, mode)
    processors, filled = [], 0
    for agent, text, n in SCRIPT:
        res = session.turn({0: Turn(agent, append=text,
                                    settings=GenerationSettings(max_new_tokens=n))})[0]
        fed = len(session.tokens[0]) - 1  # the last generated token is not fed
        processors += [lora.agent_index(agent)] * (fed - filled)
        filled = fed
        assert len(res.token_ids) == n
    target = TOK.encode(" Paris.")
    res = session.turn({0: Turn("reflect", append="\nSo:", score_tokens=tuple(target))})[0]
    ids = session.tokens[0]
    processors += [lora.agent_index("reflect")] * (len(ids) - len(processors))
    logits = forward_with_processors(params, cfg, adapters, ids, processors,
                                     bake_v=mode == "fully_shared")
    logp = jax.nn.log_softmax(logits, axis=-1)
    n = len(target)
    expect = np.asarray(logp[len(ids) - n - 1:len(ids) - 1])[np.arange(n), target]
    np.testing.assert_allclose(res.logprobs, expect, atol=1e-4, rtol=0)
    # and the shared view really differs from the reader's own (non-shared) view
    own = jax.nn.log_softmax(forward_with_processors(
        params, cfg, adapters, ids, [lora.agent_index("reflect")] * len(ids), bake_v=True), -1)
    own = np.asarray(own[len(ids) - n - 1:len(ids) - 1])[np.arange(n), target]
    assert np.abs(own - expect).max() > 1e-3
