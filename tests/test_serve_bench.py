"""eval/bench_serve.py end to end at smoke-test size on the CPU: a server subprocess driven by
concurrent HTTP clients, then the same episodes in process; the HTTP side generates the engine's
tokens and prefills as much."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


def test_bench_serve_runs_and_http_gives_the_engine_tokens(tmp_path):
    from eval.bench_serve import main

    out = tmp_path / "bench.json"
    assert main(["--random-weights", "tiny", "--length", "256", "--episodes", "3", "--clients",
                 "2", "--warmup", "1", "--compile-cache", "", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = {r["side"]: r for r in payload["rows"]}
    http, engine = rows["http"], rows["engine"]
    assert http["episodes"] == engine["episodes"] == 3
    assert http["failed"] == engine["failed"] == 0 and not http["errors"]
    assert http["turns"] == engine["turns"] > 3
    assert http["prefilled_total"] == engine["prefilled_total"]
    assert http["requests_s"] > 0 and http["ttft_p50_s"] <= http["ttft_p99_s"]
    assert http["cached_total"] > 0  # later turns reused the episode's trajectory
    # every turn after an episode's first is a pinned trajectory's return, and was timed
    assert http["return_n"] == http["turns"] - http["episodes"]
    assert 0 < http["return_p50_s"] <= http["return_p90_s"]
    assert http["return_mean_s"] < http["seconds"] and http["gather_s"] >= 0
    # both sides count their calls per shape (rows x padded prefill), the same keys, all calls
    for side in (http, engine):
        shapes = side["calls_by_shape"]
        assert sum(v["calls"] for v in shapes.values()) == side["calls"]
        assert all(1 <= int(k.split("x")[0]) <= 2 and v["seconds"] > 0 for k, v in shapes.items())
    # both sides log every timed call; the logs add up to the totals
    for side in (http, engine):
        log = side["call_log"]
        assert len(log) == side["calls"] == sum(v["calls"] for v in side["calls_by_shape"].values())
        assert sum(c["prefilled"] for c in log) == side["prefilled_total"]
        assert side["call_summary"]["decode_steps"] == sum(c["decode_steps"] for c in log) > 0
        assert all(max(c["chunks"]) == c["chunk_max"] for c in log)
    # both sides count the slots their prefills computed: at most one per slot is a real token
    assert all(0 < side["prefill_efficiency"] <= 1 for side in (http, engine))
    # both sides compiled the same call programs before their warm-up episodes
    assert http["warm_up_programs"] == engine["warm_up_programs"] > 0
    summary = payload["summary"][0]
    assert summary["mode"] == "base_lowrank_shared"
    assert summary["same_tokens_episodes"] == "3/3"  # greedy: the same tokens on both sides
    assert payload["environment"]["platform"] == "cpu"


def test_clients_spread_over_processes_give_the_same_episodes(tmp_path):
    """--client-processes: the clients run in separate processes (as separate agents would), the
    runs' times merged over them; the same turns and greedy tokens as the in-process engine.
    With --generate-scale 2 both sides generate the scaled traces' tokens, in blocks of 8."""
    from eval.bench_serve import main
    from eval.traces import generate_trace

    out = tmp_path / "bench.json"
    assert main(["--random-weights", "tiny", "--length", "384", "--episodes", "3", "--clients",
                 "3", "--client-processes", "2", "--warmup", "2", "--compile-cache", "",
                 "--generate-scale", "2", "--block-tokens", "8", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = {r["side"]: r for r in payload["rows"]}
    http, engine = rows["http"], rows["engine"]
    assert http["client_processes"] == 2 and not http["errors"]
    assert http["episodes"] == engine["episodes"] == 3 and http["turns"] == engine["turns"]
    assert http["prefilled_total"] == engine["prefilled_total"]
    assert payload["summary"][0]["same_tokens_episodes"] == "3/3"
    assert http["return_n"] == http["turns"] - http["episodes"]
    traces = [generate_trace(384, i, generate_scale=2) for i in range(3)]
    assert http["turns"] == sum(len(t.turns) for t in traces)
    generated = sum(t.generate for tr in traces for t in tr.turns)
    assert generated > sum(generate_trace(384, i).generated for i in range(3))
    for side in (http, engine):
        assert side["gen_tok_s"] * side["seconds"] == pytest.approx(generated)
        # in blocks of 8: no call decodes more than 8 steps, and the warm-up covered 8 at most
        assert max(c["decode_steps"] for c in side["call_log"]) <= 8


def test_client_processes_must_be_positive(capsys):
    from eval.bench_serve import main

    with pytest.raises(SystemExit):
        main(["--client-processes", "0"])
    assert "--client-processes must be >= 1; got 0" in capsys.readouterr().err


@pytest.mark.parametrize("scale, message", [
    ("0", "generate_scale must be a number > 0; got 0.0"),
    ("8", "generate_scale 8 leaves no room for a 48-token prompt in a 256-token trace")])
def test_generate_scale_is_checked_on_every_trace_before_anything_starts(capsys, scale, message):
    from eval.bench_serve import main

    with pytest.raises(SystemExit):
        main(["--random-weights", "tiny", "--length", "256", "--generate-scale", scale])
    assert f"--generate-scale: {message}" in capsys.readouterr().err
