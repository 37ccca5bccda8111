"""``eval/bench_multi_gpu.py`` end to end on 8 forced CPU devices at tiny size (``--cpu-smoke``):
every part runs on a one-device and a DP x TP mesh, the per-GPU bytes follow the split, training
with sharded base weights gives one device's loss; and its helpers on their own."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval import bench_multi_gpu as bench

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # --cpu-smoke sets the device count itself
    return subprocess.run([sys.executable, "-m", "eval.bench_multi_gpu", "--cpu-smoke", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(["--meshes", "1x1,2x4", "--train-meshes", "1x1,1x2", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["device_count"] == 8 and result["cpu_smoke"]
    decode, rollout, train = (result["rows"][p] for p in ("decode", "rollout", "train"))
    assert [r["mesh"] for r in decode] == ["1x1", "2x4"]
    one, split = (r["bytes_per_gpu"] for r in decode)
    # same rows per data group: a quarter of the kv heads, the whole low-rank leaf, about a
    # quarter of the weights (norms replicated; with TP > 1 the A of q|k|v and gate|up are not in
    # the weights)
    assert split["kv"] * 4 == one["kv"] and split["lowrank"] == one["lowrank"] > 0
    assert one["weights"] / 5 < split["weights"] < one["weights"] / 3.5
    assert decode[1]["rows"] == 2 * decode[0]["rows"]
    assert all(r["decode_step_ms"] > 0 for r in decode)
    assert [(r["mesh"], r["episodes"], r["failed"]) for r in rollout] == [("1x1", 2, 0),
                                                                          ("2x4", 4, 0)]
    assert [r["mesh"] for r in train] == ["1x1", "1x2"]
    assert train[1]["global_rows"] == train[0]["global_rows"]
    assert train[1]["loss_relative_difference"] < 1e-4  # base weights split over 2: same loss
    assert "--model llama3_1_70b --meshes 1x4,1x8,2x4" in proc.stdout


def test_mesh_larger_than_the_devices_is_refused(tmp_path):
    proc = _run(["--parts", "decode", "--meshes", "4x4", "--out", str(tmp_path / "x.json")],
                tmp_path)
    assert proc.returncode == 2
    assert "mesh 4x4 needs 16 devices; 8 available" in proc.stderr


def test_arguments_and_loss_comparison(tmp_path):
    assert bench._meshes("1x1,2X4") == [(1, 1), (2, 4)]
    for bad in ("2y4", "0x2", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench._meshes(bad)
    for name, losses in (("a", [2.0, 1.5, 1.0]), ("b", [2.0, 1.5 * (1 + 3e-6), 1.0])):
        folder = tmp_path / name
        folder.mkdir()
        records = [{"event": "start", "step": 0}] + [
            {"event": "step", "step": i + 1, "loss": x} for i, x in enumerate(losses)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = bench.compare_loss(tmp_path / "a", tmp_path / "b")
    assert result["steps"] == [1, 2, 3] and result["step_of_max"] == 2
    assert abs(result["max_relative_difference"] - 3e-6) < 1e-9
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        bench.compare_loss(tmp_path / "a", tmp_path / "missing")
    commands = bench.gpu_commands()
    assert "NCCL" not in commands  # NCCL variables (NVLink multicast among them) never set
    for gpus in (2, 4, 8):
        assert f"results/multi_gpu/{gpus}gpu-8b-decode.json" in commands
