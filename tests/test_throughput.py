"""The throughput benchmark on a tiny model: every mode, both row rules, JSON, plot, bad options;
and the engine-backed trace replay the efficiency benchmark can call."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from eval import throughput
from eval.cli import tiny_config
from eval.common import NullTokenizer
from eval.traces import generate_trace
from lragent_jax.session import Session


def test_trace_workload_same_and_max_rows(tmp_path, capsys):
    out = tmp_path / "tp.json"
    assert throughput.main(["--workloads", "traces", "--trace-model", "tiny", "--lengths", "256",
                            "--modes", "non_shared,base_lowrank_shared",
                            "--episodes", "3", "--warmup", "1", "--rows", "same:2,max,same:5000",
                            "--budget-gib", "0.05", "--no-progress", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["partial"] is False
    assert {"device", "jax", "date", "command"} <= set(payload["environment"])
    skipped = [r for r in payload["rows"] if "skipped" in r]
    assert [(r["mode"], r["rows"]) for r in skipped] == [("non_shared", 5000),
                                                         ("base_lowrank_shared", 5000)]
    assert all("5000 rows of mode" in r["skipped"] and "do not fit" in r["skipped"]
               for r in skipped)
    rows = [r for r in payload["rows"] if "skipped" not in r]
    assert len(rows) == 4  # 2 modes x 2 row rules that fit
    trace = generate_trace(256, 0)
    for row in rows:
        assert row["failed"] == 0 and row["episodes"] == 3
        assert row["episodes_s"] > 0 and row["gen_tok_s"] > 0
        assert row["episodes_s_ex_compile"] == pytest.approx(
            row["episodes"] / (row["seconds"] - row["compile_s_in_timed"]))
        assert row["ttft_p50_s"] <= row["ttft_p99_s"]
        assert row["turns"] == sum(len(generate_trace(256, i).turns) for i in range(3))
        assert row["generated"] == sum(generate_trace(256, i).generated for i in range(3))
        assert 0 < row["prefill_efficiency"] <= 1
        if row["rows_rule"] == "max":
            assert f"{row['rows']} rows of mode {row['mode']}" in row["budget"]
        else:
            assert row["rows"] == 2
    by = {(r["mode"], r["rows_rule"]): r for r in rows}
    # sharing prefills each token once; non-shared agents prefill what the others wrote
    assert by["base_lowrank_shared", "same"]["prefilled_total"] < \
        by["non_shared", "same"]["prefilled_total"]
    assert by["base_lowrank_shared", "max"]["rows"] >= by["non_shared", "max"]["rows"]
    assert trace.total <= rows[0]["capacity"]
    assert (tmp_path / "tp.png").stat().st_size > 0
    summary = {(s["length"], s["rows_rule"]): s for s in payload["summary"]}
    assert summary[256, "same"]["lr_vs_non_shared"] == pytest.approx(
        by["base_lowrank_shared", "same"]["episodes_s"] / by["non_shared", "same"]["episodes_s"])
    assert "episodes/s over the other modes" in capsys.readouterr().out
    # results of separate runs (one per mode) merge into one file with the same summary
    halves = []
    for mode in ("non_shared", "base_lowrank_shared"):
        half = dict(payload, rows=[r for r in payload["rows"] if r["mode"] == mode])
        halves.append(tmp_path / f"{mode}.json")
        halves[-1].write_text(json.dumps(half))
    merged = tmp_path / "merged.json"
    assert throughput.main(["--merge", *map(str, halves), "--out", str(merged)]) == 0
    assert json.loads(merged.read_text())["summary"] == payload["summary"]
    assert (tmp_path / "merged.png").stat().st_size > 0


def test_bad_options_are_named(capsys):
    for argv, message in ((["--rows", "same:0"], "--rows items are 'same:N' (N >= 1) or 'max'"),
                          (["--workloads", "chat"], "unknown workload(s) ['chat']"),
                          (["--modes", "shared"], "unknown share mode 'shared'"),
                          (["--lengths", "100"], "--lengths must be >= 256 tokens; got [100]"),
                          (["--budget-gib", "-1"], "--budget-gib must be > 0; got -1.0"),
                          (["--merge", "/nonexistent.json"], "--merge: no such file")):
        with pytest.raises(SystemExit):
            throughput.main(argv)
        assert message in capsys.readouterr().err


def test_engine_replay_is_a_drop_in_for_the_efficiency_replay():
    from eval.efficiency import replay

    config, params, lora, adapters = throughput.random_model(tiny_config(), dtype=jnp.float32)
    trace = generate_trace(256, 3)

    def session(rows):
        return Session(config, params, NullTokenizer(), adapters=adapters, lora=lora,
                       mode="non_shared", batch=rows, capacity=512, cache_dtype=jnp.float32,
                       prefill_chunk=256, min_chunk_bucket=256, min_new_bucket=64)

    old = replay(session(1), trace, np.random.default_rng(0))
    new = throughput.replay_with_engine(session(1), trace, np.random.default_rng(0))
    assert set(new) == set(old)
    assert new["prefilled"] == old["prefilled"]  # the same turns and first-token split
    assert len(new["ttft_s"]) == len(old["ttft_s"]) == len(trace.turns)
    many = throughput.replay_many(session(2), [trace, generate_trace(256, 4)], seed=1)
    assert many[0]["prefilled"] == old["prefilled"] and len(many) == 2


def test_throughput_is_a_part_of_python_m_eval(tmp_path):
    from eval import cli

    assert cli.main(["--model", "tiny", "--adapters", "random", "--parts", "throughput",
                     "--modes", "base_lowrank_shared", "--lengths", "256", "--questions", "2",
                     "--batch", "2", "--capacity", "1024", "--max-steps", "1", "--min-bucket",
                     "256", "--no-plots", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["throughput"]
    assert {(r["workload"], r["rows_rule"]) for r in results["rows"]} == {
        ("traces", "same"), ("traces", "max"), ("kb", "same"), ("kb", "max")}
    assert all(r["failed"] == 0 for r in results["rows"])
    for row in results["rows"]:
        if row["workload"] == "kb":  # scored as the accuracy part scores it
            assert row["episodes"] == 2 and 0 <= row["accuracy"] <= 1 and row["mean_tokens"] > 100
    assert (tmp_path / "throughput.json").is_file()
