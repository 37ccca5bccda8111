"""The server's warm-up: every program the engine's calls run for the warmed sampling kinds is
compiled before the first request (none compiles while serving), the answers stay those of a
cold server, and the CLI's --warm-up takes only 'auto', 'none' or sampling kinds. The call log:
one JSON line per engine call, appended."""

from __future__ import annotations

import concurrent.futures
import json

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from lragent_jax.generate import run_turn  # noqa: E402
from lragent_jax.serve.__main__ import build_parser, main  # noqa: E402
from tests.serve_helpers import fresh, post, running, tiny_model  # noqa: E402

ROWS, BLOCK = 4, 8
# chunk buckets 16, 32, 64 and 256 (a chunk over 64 tokens), the packed lane of 2 or 4 segments of
# 64 per step
OPTIONS = dict(rows=ROWS, block_tokens=BLOCK, capacity=256, prefill_chunk=64, min_chunk_bucket=16,
               long_lane=True)


def _requests(seed):
    """Greedy completions whose prompts fall in every chunk bucket, sent together so that some
    calls carry one or two long prompts beside short ones (the lane) and some only short ones."""
    rng = np.random.default_rng(seed)
    lengths = [int(rng.integers(a, b)) for a, b in
               ((2, 14), (17, 30), (33, 60), (70, 150), (2, 10), (90, 160), (20, 60), (3, 9))]
    letters = list("abcdefghij klmnop\n")
    return [{"model": ("plan", "action", "reflect")[i % 3],
             "prompt": fresh("".join(rng.choice(letters) for _ in range(n))),
             "max_tokens": int(rng.integers(1, 20)), "temperature": 0}
            for i, n in enumerate(lengths)]


def _answers(url, requests):
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda body: post(url, "/v1/completions", body), requests))
    assert all(status == 200 for status, _ in replies), replies
    return [reply["choices"][0]["text"] for _, reply in replies]


def test_a_warmed_server_compiles_nothing_while_serving_and_answers_as_a_cold_one():
    model = tiny_model()
    requests = _requests(int(np.random.default_rng().integers(1 << 30)))
    again = [{**r, "prompt": fresh(r["prompt"][1:])} for r in requests[:3]]  # fewer rows busy
    lines = []
    with running(model, warm_up=("greedy",), log=lambda *a, **k: lines.append(" ".join(a)),
                 **OPTIONS) as (server, url):
        programs = len(server.session.turn_programs(range(1, BLOCK + 1), ("greedy",)))
        assert programs == 6  # 4 chunk buckets, and the 256 bucket with a lane of 2 and of 4
        assert lines[0].startswith(f"warm-up: compiling {programs} turn programs (greedy)")
        assert len(lines) == programs + 2 and lines[-1].startswith(f"warm-up: {programs} programs")
        compiled = run_turn._cache_size()
        warm = _answers(url, requests)
        warm += _answers(url, again)
        assert run_turn._cache_size() == compiled, "a request compiled a program"
    with running(model, **OPTIONS) as (server, url):
        cold = _answers(url, requests)
        cold += _answers(url, again)
    assert warm == cold


def test_warm_up_flag_takes_auto_none_or_sampling_kinds(capsys):
    parse = build_parser().parse_args
    assert parse([]).warm_up == "auto"
    assert parse(["--warm-up", "none"]).warm_up == "none"
    assert parse(["--warm-up", "greedy, sample_filtered"]).warm_up == ("greedy",
                                                                       "sample_filtered")
    for bad in ("beam", "greedy,beam", ","):
        with pytest.raises(SystemExit):
            main(["--warm-up", bad])
        err = capsys.readouterr().err
        assert "--warm-up" in err and "sample_filtered" in err and repr(bad) in err


def test_call_log_appends_one_line_per_call_and_keeps_what_was_there(tmp_path):
    model = tiny_model()
    log = tmp_path / "calls.jsonl"
    log.write_text('{"kept": true}\n')
    requests = _requests(int(np.random.default_rng().integers(1 << 30)))
    with running(model, call_log=str(log), **OPTIONS) as (server, url):
        _answers(url, requests)
        calls = server.engine.batcher.num_calls
    kept, *lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert kept == {"kept": True} and len(lines) == calls > 0
    for line in lines:
        assert len(line["chunks"]) == line["rows"] == len(line["agents"])
        assert max(line["chunks"]) == line["chunk_max"] and line["seconds"] > 0
        assert line["prefill_slots"] >= line["prefilled"] > 0
    assert [line["end"] for line in lines] == sorted(line["end"] for line in lines)
    # every request's first call prefilled its prompt: at least the prompts' tokens in all
    assert sum(line["prefilled"] for line in lines) >= sum(
        len(model.tokenizer.encode(r["prompt"])) for r in requests)


def test_call_log_flag_refuses_a_file_it_cannot_append_to(tmp_path, capsys):
    bad = tmp_path / "missing" / "calls.jsonl"
    with pytest.raises(SystemExit):
        main(["--call-log", str(bad)])
    err = capsys.readouterr().err
    assert "--call-log" in err and str(bad) in err
