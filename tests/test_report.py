"""Figures and summary from saved results: which efficiency rows win, and accuracy inputs."""

from __future__ import annotations

import json

import pytest

from eval import report

MODES = ("non_shared", "fully_shared", "base_shared", "base_lowrank_shared")


def _efficiency(path, date, e2e, *, log=False):
    rows = [{"model": "m", "length": 2048, "mode": mode, "attn": "reference", "e2e_s": e2e + i,
             **({} if log else {"ttft_s": [0.1, 0.01], "ttft_first_turn_of": {"plan": 0.1}})}
            for i, mode in enumerate(MODES)]
    path.write_text(json.dumps({"environment": {"date": date, "platform": "gpu"}, "rows": rows}))


def test_measured_and_newer_rows_win(tmp_path):
    _efficiency(tmp_path / "efficiency_a_from_log.json", "2026-12-01", 100.0, log=True)
    _efficiency(tmp_path / "efficiency_b_old.json", "2026-01-01", 10.0)
    _efficiency(tmp_path / "efficiency_c_new.json", "2026-06-01", 20.0)
    assert report.main([str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    got = {r["mode"]: r["e2e_s"] for r in summary["efficiency"]}
    assert got == {mode: 20.0 + i for i, mode in enumerate(MODES)}
    for name in ("throughput_reference.png", "ttft.png", "memory.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_accuracy_from_aggregates_and_errors(tmp_path):
    acc = {mode: {"accuracy": 0.5 + 0.1 * i, "stderr": 0.05} for i, mode in enumerate(MODES)}
    (tmp_path / "results.json").write_text(json.dumps({"accuracy": {"modes": acc}}))
    (tmp_path / "plain.json").write_text(json.dumps({"accuracy": acc}))
    assert report.main([str(tmp_path), "--accuracy", "a=results.json",
                        "--accuracy", "b=plain.json"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["accuracy"]["a"] == acc and summary["accuracy"]["b"] == acc
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    (tmp_path / "bad.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no per-mode accuracy"):
        report.main([str(tmp_path), "--accuracy", "c=bad.json"])
    with pytest.raises(SystemExit):
        report.main([str(tmp_path), "--accuracy", "missing.json"])
