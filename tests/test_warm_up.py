"""Session.warm_up: every program a generating turn may run is compiled ahead of time, and
warming up changes nothing a turn sees (trajectories, counters, cache entries, outputs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.generate import run_turn
from lragent_jax.lora import init_adapters
from lragent_jax.model import init_params
from lragent_jax.session import GenerationSettings, Session, Turn
from tests.conftest import CharTokenizer

TOK = CharTokenizer()
AGENTS = ("plan", "action", "reflect")


def _model():
    cfg = ModelConfig.tiny(vocab_size=TOK.vocab_size, eos_token_ids=())
    params = init_params(jax.random.key(11), cfg)
    lora = LoraConfig(rank=4, targets=("q", "v"), agents=AGENTS)
    return cfg, params, lora, init_adapters(jax.random.key(12), cfg, lora, b_scale=0.3)


@pytest.fixture(scope="module")
def model():
    return _model()


def _session(model, batch=4, **kw):
    cfg, params, lora, adapters = model
    options = dict(capacity=256, cache_dtype=jnp.float32, prefill_chunk=32, min_chunk_bucket=8,
                   min_new_bucket=8, long_lane=True)
    options.update(kw)
    return Session(cfg, params, TOK, adapters=adapters, lora=lora, mode="base_lowrank_shared",
                   batch=batch, **options)


def _text(rng, n):
    return "".join(rng.choice(list("abcdefgh ijklmnop\n")) for _ in range(n))


def test_turn_programs_are_every_chunk_bucket_with_and_without_each_lane_size(model):
    s = _session(model)
    # chunk buckets 8, 16, 32 (up to prefill_chunk) and 256 (the capacity: every long chunk); a
    # lane needs chunks over 4 x 8 tokens, so only the long bucket has one: its chunks come in
    # segments of 32, at least 2 of them, and take 2 or 4 per step (1 never has the fewest steps)
    got = [(p.chunk_bucket, p.long_rows, p.max_new_bucket, p.sampling)
           for p in s.turn_programs()]
    assert got == [(8, 0, 8, "greedy"), (16, 0, 8, "greedy"), (32, 0, 8, "greedy"),
                   (256, 0, 8, "greedy"), (256, 2, 8, "greedy"), (256, 4, 8, "greedy")]
    both = s.turn_programs(max_new_tokens=(3, 20), sampling=("greedy", "sample"))
    assert len(both) == 2 * 2 * 6
    assert {p.max_new_bucket for p in both} == {8, 32}
    assert {p.sampling for p in both} == {"greedy", "sample"}
    # without the lane: the chunk buckets only; a session of one row has no lane either
    assert [p.chunk_bucket for p in _session(model, long_lane=False).turn_programs()] == [
        8, 16, 32, 256]
    assert [p.long_rows for p in _session(model, batch=1).turn_programs()] == [0, 0, 0, 0]


@pytest.mark.parametrize("bad, match", [
    (dict(sampling=("greedy", "beam")), "beam"), (dict(sampling=()), "allowed"),
    (dict(max_new_tokens=(4, 0)), "max_new_tokens")])
def test_turn_programs_reject_bad_values(model, bad, match):
    with pytest.raises(ValueError, match=match):
        _session(model).turn_programs(**bad)


def _calls(seed):
    """Greedy calls on 4 rows whose longest chunks fall in every chunk bucket: one long row of 2
    segments (2 per step), two of 2 (4 per step), three of 2 (no lane: it would compute as much),
    and short chunks of each bucket."""
    rng = np.random.default_rng(seed)
    lengths = [(int(rng.integers(5, 8)), 0, 3, 0), (int(rng.integers(40, 65)), 5, 7, 2),
               (3, int(rng.integers(40, 60)), int(rng.integers(33, 50)), 1),
               (int(rng.integers(9, 16)), 0, 4, 6), (int(rng.integers(17, 32)), 2, 0, 3),
               (int(rng.integers(40, 50)), 3, int(rng.integers(40, 50)), int(rng.integers(40, 50)))]
    calls = []
    for row_lengths in lengths:
        settings = GenerationSettings(max_new_tokens=int(rng.integers(2, 8)))
        calls.append({row: Turn(AGENTS[(row + len(calls)) % 3], append=_text(rng, n) or "x",
                                settings=settings)
                      for row, n in enumerate(row_lengths)})
    return calls


def test_warm_up_compiles_every_program_the_turns_run_and_changes_nothing(model):
    calls = _calls(int(np.random.default_rng().integers(1 << 30)))
    warm, cold = _session(model), _session(model)
    first = calls[0]
    assert warm.turn(first).keys() == cold.turn(first).keys()
    cache_before = [np.asarray(x) for x in jax.tree.leaves(warm.cache)]
    processed, tokens = warm.processed.copy(), [list(t) for t in warm.tokens]
    seen = []
    report = warm.warm_up(progress=lambda i, n, shape, s: seen.append((i, n, shape.long_rows)))
    assert [(r["chunk_bucket"], r["long_rows"]) for r in report] == [
        (8, 0), (16, 0), (32, 0), (256, 0), (256, 2), (256, 4)]
    assert seen == [(i + 1, 6, r["long_rows"]) for i, r in enumerate(report)]
    assert all(r["seconds"] > 0 for r in report)
    # nothing a turn sees changed: tokens, counters and every cache entry
    assert warm.tokens == tokens
    np.testing.assert_array_equal(warm.processed, processed)
    for a, b in zip(jax.tree.leaves(warm.cache), cache_before):
        np.testing.assert_array_equal(np.asarray(a), b)
    compiled = run_turn._cache_size()
    lanes = []
    for turns in calls[1:]:
        got, want = warm.turn(turns), cold.turn(turns)
        lanes.append(warm.last_long_lane)
        for row in turns:
            assert got[row].token_ids == want[row].token_ids, row
    assert lanes == [2, 4, 0, 0, 0]  # the script reached the lane sizes and the no-lane call
    assert run_turn._cache_size() == compiled, "a turn compiled a program warm_up did not"
    assert warm.tokens == cold.tokens


def test_programs_compiled_in_threads_serve_the_turns(model):
    from lragent_jax.runtime import persistent_cache_active

    assert not persistent_cache_active()  # conftest.py: so warm_up below compiles in two threads
    s = _session(model, capacity=128)  # programs no other test compiled
    seen = []
    report = s.warm_up(workers=2, progress=lambda i, n, shape, sec: seen.append((i, n, shape)))
    assert [i for i, _, _ in seen] == list(range(1, len(report) + 1))
    assert sorted(map(repr, (shape for _, _, shape in seen))) == sorted(
        map(repr, s.turn_programs()))
    compiled = run_turn._cache_size()
    for turns in _calls(int(np.random.default_rng().integers(1 << 30)))[:3]:
        s.turn(turns)
    assert run_turn._cache_size() == compiled, "a turn compiled a program warm_up did not"
    with pytest.raises(ValueError, match="workers"):
        s.warm_up(workers=0)


_ONE_AT_A_TIME = """
import concurrent.futures, json, sys

from lragent_jax import session as session_module
from lragent_jax.runtime import enable_compilation_cache, persistent_cache_active
from tests.test_warm_up import _model, _session

pools = []

class Recording(concurrent.futures.ThreadPoolExecutor):
    def __init__(self, workers, *args, **kwargs):
        pools.append(workers)
        super().__init__(workers, *args, **kwargs)

session_module.concurrent.futures.ThreadPoolExecutor = Recording
enable_compilation_cache(sys.argv[1], min_compile_seconds=0)  # every program is written
s = _session(_model(), batch=1, capacity=64)
out = {"active": persistent_cache_active(), "compiled": len(s.warm_up(workers=2)),
       "programs": len(s.turn_programs()), "pools": pools}
import jax
from jax.experimental.compilation_cache import compilation_cache

jax.config.update("jax_enable_compilation_cache", False)
out["active_after_settings_off"] = persistent_cache_active()  # jax still holds the folder
compilation_cache.reset_cache()
out["active_after_reset"] = persistent_cache_active()
print(json.dumps(out))
"""


def test_warm_up_compiles_one_at_a_time_on_a_cpu_with_a_persistent_cache(tmp_path):
    """On a CPU with the persistent cache on, warm_up compiles in the calling thread, whatever
    number of workers it is asked for (concurrent CPU cache writes are not shown safe). In a
    subprocess: no test uses the persistent cache in the pytest process (conftest.py)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _ONE_AT_A_TIME, str(tmp_path / "cache")],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["active"]
    assert out["compiled"] == out["programs"] > 0
    assert out["pools"] == []  # no thread pool: every program compiled in the calling thread
    assert any((tmp_path / "cache").iterdir())  # the programs went to the persistent cache
    assert out["active_after_settings_off"] and not out["active_after_reset"]
