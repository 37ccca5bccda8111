"""The packed long-prefill lane: a call's long chunks are cut in segments of the prefill step and
a fixed number of segments prefill per step, whatever rows they come from (segments of one row in
one step, a row spread over two steps); every row's tokens and cache entries are those of the call
without the lane."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lragent_jax.cache import ALL_MODES
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.lora import init_adapters
from lragent_jax.model import forward, init_params
from lragent_jax.session import GenerationSettings, Session, Turn
from lragent_jax.sharding import make_mesh
from tests.conftest import CharTokenizer

TOK = CharTokenizer()
AGENTS = ("plan", "action", "reflect")


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.tiny(vocab_size=TOK.vocab_size, eos_token_ids=())
    params = init_params(jax.random.key(3), cfg)
    lora = LoraConfig(rank=4, targets=("q", "v", "o", "down"), agents=AGENTS)
    return cfg, params, lora, init_adapters(jax.random.key(4), cfg, lora, b_scale=0.3)


def _session(model, mode, long_lane, batch=4, capacity=256):
    cfg, params, lora, adapters = model
    return Session(cfg, params, TOK, adapters=adapters, lora=lora, mode=mode, batch=batch,
                   capacity=capacity, cache_dtype=jnp.float32, prefill_chunk=32, min_chunk_bucket=8,
                   min_new_bucket=8, long_lane=long_lane)


def _text(rng, n):
    return "".join(rng.choice(list("abcdefgh ijklmnop\n")) for _ in range(n))


def _script(seed):
    """Five calls on 4 rows, in segments of 32 tokens (a long chunk: over 32 tokens), each with
    the lane size it takes (steps cost 32 x size + 256 tokens: the fewest steps win here):
    one 2-segment row (2 per step); one 3-segment row (4 per step, one step: a row's segments
    attend to each other in one step); a 2- and a 4-segment row (4 per step, two steps: the
    second row spans both); three long rows, more than half the batch (4 per step, two steps);
    four long rows of one length (no lane: it would compute as much). Agents differ across rows
    (each row keeps its agent, so that no non-shared agent catches up on a long history); the
    third call samples."""
    rng = np.random.default_rng(seed)

    def n(lo, hi):
        return int(rng.integers(lo, hi + 1))

    lengths = [(n(33, 64), 5, 9, 3),
               (3, n(65, 96), 9, 13),
               (2, n(33, 64), 3, n(97, 128)),
               (n(33, 40), 2, n(97, 128), n(33, 40)),
               (40, 40, 40, 40)]
    calls = []
    for i, row_lengths in enumerate(lengths):
        settings = GenerationSettings(max_new_tokens=int(rng.integers(2, 6)),
                                      temperature=0.8 if i == 2 else 0.0,
                                      seed=int(rng.integers(0, 1000)))
        calls.append({row: Turn(AGENTS[row % 3], append=_text(rng, k), settings=settings)
                      for row, k in enumerate(row_lengths)})
    return calls


LANES = [2, 4, 4, 4, 0]


@pytest.mark.parametrize("mode", [m.value for m in ALL_MODES])
def test_lane_gives_every_row_the_tokens_and_cache_of_the_call_without_it(model, mode):
    seed = zlib.crc32(mode.encode())  # other text per mode
    on, off = _session(model, mode, True, capacity=384), _session(model, mode, False,
                                                                  capacity=384)
    lanes = []
    for turns in _script(seed):
        with_lane, without = on.turn(turns), off.turn(turns)
        lanes.append(on.last_long_lane)
        assert off.last_long_lane == 0
        for row in turns:
            assert with_lane[row].token_ids == without[row].token_ids, (mode, row)
            assert with_lane[row].prefilled == without[row].prefilled > 0
    assert lanes == LANES
    assert on.tokens == off.tokens
    np.testing.assert_array_equal(on.processed, off.processed)
    for a, b in zip(jax.tree.leaves(on.cache), jax.tree.leaves(off.cache)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


def test_lane_row_matches_a_full_forward_without_cache(model):
    """Independent check: the greedy tokens of a long row whose segments fall in two steps (row 0
    brings 3 segments first, row 3 then 4: 4 per step), recomputed by a cache-free forward over
    the whole sequence each step."""
    cfg, params, lora, adapters = model
    session = _session(model, "base_lowrank_shared", True)
    rng = np.random.default_rng()
    prompt = _text(rng, int(rng.integers(97, 121)))
    turns = {3: Turn("action", append=prompt, settings=GenerationSettings(max_new_tokens=5)),
             0: Turn("plan", append=_text(rng, int(rng.integers(65, 97))),
                     settings=GenerationSettings(max_new_tokens=2))}
    turns.update({r: Turn("plan", append=_text(rng, 6),
                          settings=GenerationSettings(max_new_tokens=2)) for r in (1, 2)})
    got = session.turn(turns)[3].token_ids
    assert session.last_long_lane == 4
    ids = TOK.encode(prompt)
    fwd = jax.jit(forward, static_argnames=("config",))
    want = []
    for _ in range(5):
        tokens = np.zeros((1, 128), np.int32)
        tokens[0, :len(ids)] = ids
        logits = fwd(params, jnp.asarray(tokens), config=cfg, adapters=adapters,
                     adapter_index=jnp.asarray([AGENTS.index("action")]),
                     lengths=jnp.asarray([len(ids)]))[0, len(ids) - 1]
        want.append(int(jnp.argmax(logits)))
        ids.append(want[-1])
    eos = TOK.eos_token_ids[0]  # the session ends a turn at the tokenizer's end token
    assert got == (want[:want.index(eos)] if eos in want else want)
    assert got


def test_lane_is_taken_only_where_it_saves_a_quarter(model):
    session = _session(model, "fully_shared", True, batch=8)
    rng = np.random.default_rng(5)
    settings = GenerationSettings(max_new_tokens=1)

    def call(lengths):
        session.reset()
        session.turn({r: Turn(None, append=_text(rng, n), settings=settings)
                      for r, n in enumerate(lengths)})
        return session.last_long_lane

    assert session.lane_sizes == (1, 2, 4, 8)
    # segments of 32 tokens; a step of p segments costs 32 p + 256 tokens' worth: the fewest
    # steps, then the smallest p
    assert call([40, 3, 3, 3, 3, 3, 3, 3]) == 2  # 2 segments: 8 x 8 + 2 x 32 of 8 x 64
    assert call([100, 3, 3, 3, 3, 3, 3, 3]) == 4  # 4 segments, one step
    # 14 segments in two steps of 8, more than half the rows long: 8 x 8 + 2 x 8 x 32 of 8 x 128
    assert call([100, 90, 70, 60, 50, 3, 3, 3]) == 8
    assert call([64] * 8) == 0  # 16 segments fill two steps of 8: as much as every row over 64
    # the short rows' chunks fill the short lane: 8 x 32 + 4 x 32 of 8 x 64 tokens, 3/4, taken;
    # with 6 segments, 8 x 32 + 8 x 32: nothing saved
    assert call([40, 40, 30, 30, 30, 30, 30, 30]) == 4
    assert call([40, 40, 40, 30, 30, 30, 30, 30]) == 0
    assert call([10] * 8) == 0  # nothing long
    off = _session(model, "fully_shared", None, batch=8)
    assert not off.long_lane or off.prefill_chunk > off.min_chunk_bucket


def test_long_lane_option_errors(model):
    cfg, params, lora, adapters = model
    with pytest.raises(ValueError, match="long_lane must be True, False or None.*'yes'"):
        Session(cfg, params, TOK, adapters=adapters, lora=lora, batch=2, long_lane="yes")
    with pytest.raises(ValueError, match="long_lane=True needs a session without a mesh"):
        Session(cfg, params, TOK, adapters=adapters, lora=lora, batch=2, long_lane=True,
                mesh=make_mesh(data=1, model=1))
    auto = Session(cfg, params, TOK, adapters=adapters, lora=lora, batch=2, prefill_chunk=32,
                   min_chunk_bucket=8)
    assert auto.long_lane
    cpu_default = Session(cfg, params, TOK, adapters=adapters, lora=lora, batch=2)
    assert cpu_default.long_lane == (cpu_default.prefill_chunk > cpu_default.min_chunk_bucket)


def test_batcher_counts_the_slots_the_lane_computed(model):
    from lragent_jax.rollout import TurnBatcher

    session = _session(model, "base_lowrank_shared", True)
    batcher = TurnBatcher(session, record_calls=True)
    rows = [batcher.acquire() for _ in range(4)]
    rng = np.random.default_rng(2)
    settings = GenerationSettings(max_new_tokens=2)
    for r, n in zip(rows, (90, 5, 7, 3)):
        batcher.submit(r, Turn(AGENTS[r % 3], append=_text(rng, n), settings=settings))
    done = batcher.step()
    assert len(done) == 4 and all(d.error is None for d in done)
    call = batcher.calls[-1]
    # the 90-token chunk: 3 segments of 32 in one step of 4; the others one step of 8
    assert (call.long_lane, call.prefill_slots) == (4, 4 * 32 + 4 * 8)
    assert batcher.padded_prefill == call.prefill_slots == session.prefill_slots


def test_bench_long_lane_script(tmp_path):
    import json

    from eval import bench_long_lane

    out = tmp_path / "lane.json"
    assert bench_long_lane.main(["--random-weights", "tiny", "--modes", "fully_shared",
                                 "--rows", "4", "--capacity", "256", "--long", "1",
                                 "--lengths", "100", "--repeats", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["lane_rows"] == 1
    # 100 tokens: one segment of the 128 bucket, one per step; the short rows one step of 16
    assert (row["full_slots"], row["lane_slots"]) == (4 * 128, 4 * 16 + 1 * 128)
    assert row["lane_s"] > 0 and row["full_s"] > 0
    with pytest.raises(SystemExit):
        bench_long_lane.main(["--rows", "4", "--long", "5", "--out", str(out)])
