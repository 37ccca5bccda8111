"""The multi-host code path on one machine: the same program started as one process per device
group through ``jax.distributed`` (CPU devices, gloo collectives), against one process holding
all the devices.

- ``python -m train --coordinator ... --num-processes 2 --process-id i`` (one CPU device each):
  the same loss curve, validation and exported adapters as one process with two devices, the
  checkpoint written once, the metrics and adapters by process 0 only.
- A session on a 2x2 mesh whose data axis spans the two processes (two devices each, heads split
  inside a process, as on several GPU hosts): the same greedy and sampled tokens in both
  processes as in one process with four devices.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _start(args, devices: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(devices),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(procs: dict, logs: dict) -> None:
    try:
        for name, proc in procs.items():
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc in procs.values():  # a process left waiting for its peer is ended here
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n" + \
            logs[name].read_text()[-3000:]


TRAIN_ARGS = ["-m", "train", "--model", "tiny", "--kb-train", "16", "--kb-valid", "4",
              "--batch-size", "4", "--max-steps", "2", "--max-len", "1024",
              "--bucket-multiple", "1024", "--remat", "none", "--dtype", "float32",
              "--no-progress", "--no-plot"]


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _adapter_arrays(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return {f"{role.name}/{k}": v for role in sorted(folder.iterdir()) if role.is_dir()
            for k, v in load_file(role / "adapter_model.safetensors").items()}


@pytest.mark.slow
def test_training_over_two_processes_matches_one(tmp_path):
    port = _free_port()
    multi, single = tmp_path / "multi", tmp_path / "single"
    logs = {name: tmp_path / f"{name}.log" for name in ("p0", "p1", "single")}
    procs = {f"p{i}": _start([*TRAIN_ARGS, "--out", str(multi), "--coordinator",
                              f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                             1, logs[f"p{i}"]) for i in range(2)}
    procs["single"] = _start([*TRAIN_ARGS, "--out", str(single)], 2, logs["single"])
    _wait(procs, logs)

    runs = {name: _records(folder) for name, folder in (("multi", multi), ("single", single))}
    for records in runs.values():
        assert records[0]["event"] == "start" and records[0]["devices"] == 2
        assert records[0]["mesh"] == {"data": 2, "model": 1}
    steps = {name: [r["loss"] for r in records if r["event"] == "step"]
             for name, records in runs.items()}
    valid = {name: [r["loss"] for r in records if r["event"] == "validation"]
             for name, records in runs.items()}
    assert len(steps["single"]) == 2 and len(valid["single"]) == 1
    np.testing.assert_allclose(steps["multi"], steps["single"], rtol=1e-5)
    np.testing.assert_allclose(valid["multi"], valid["single"], rtol=1e-5)
    # one record per step: process 1 wrote none
    assert sum(r["event"] == "step" for r in runs["multi"]) == 2
    assert [p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]
    a, b = _adapter_arrays(multi / "adapters"), _adapter_arrays(single / "adapters")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert "done: 2 steps" in logs["p1"].read_text()


ROLLOUT = textwrap.dedent(r"""
    import json, sys
    from lragent_jax import sharding
    coordinator, processes, process_id, out_path = sys.argv[1:5]
    sharding.initialize_distributed(None if coordinator == "-" else coordinator, int(processes),
                                    int(process_id))
    import jax, jax.numpy as jnp
    from lragent_jax.config import LoraConfig, ModelConfig
    from lragent_jax.lora import init_adapters
    from lragent_jax.model import init_params
    from lragent_jax.session import GenerationSettings, Session, Turn
    from tests.conftest import CharTokenizer

    tok = CharTokenizer()
    cfg = ModelConfig.tiny(vocab_size=100, eos_token_ids=(), num_heads=4, num_kv_heads=2,
                           intermediate_size=64)
    params = init_params(jax.random.key(0), cfg)
    lora = LoraConfig(rank=4, targets=("q", "v", "o", "down"))
    adapters = init_adapters(jax.random.key(1), cfg, lora, b_scale=0.3)
    mesh = sharding.make_mesh(data=2, model=2)  # process p's two devices: data row p
    s = Session(cfg, params, tok, adapters=adapters, lora=lora, mode="base_lowrank_shared",
                batch=4, capacity=128, cache_dtype=jnp.float32, prefill_chunk=64,
                min_chunk_bucket=64, mesh=mesh)
    for row in range(4):
        s.append_text(row, f"Trajectory {row}: question?\n")
    agents = ["plan", "action", "reflect", "plan"]
    for step, temperature in enumerate((0.0, 0.8)):
        s.turn({row: Turn(agents[(row + step) % 4], append=["T:", "\nA["][step],
                          settings=GenerationSettings(max_new_tokens=5, temperature=temperature,
                                                      seed=row)) for row in range(4)})
    local_rows = sorted({int(sh.index[0].start or 0)
                         for sh in s.cache.arrays.k[0].addressable_shards})
    json.dump({"process": jax.process_index(), "processes": jax.process_count(),
               "devices": jax.device_count(), "local_devices": jax.local_device_count(),
               "local_cache_rows_start": local_rows, "tokens": s.tokens}, open(out_path, "w"))
""")


@pytest.mark.slow
def test_session_over_two_processes_matches_one(tmp_path):
    port = _free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("p0", "p1", "single")}
    outs = {name: tmp_path / f"{name}.json" for name in logs}
    procs = {f"p{i}": _start(["-c", ROLLOUT, f"127.0.0.1:{port}", "2", str(i), str(outs[f"p{i}"])],
                             2, logs[f"p{i}"]) for i in range(2)}
    procs["single"] = _start(["-c", ROLLOUT, "-", "1", "0", str(outs["single"])], 4,
                             logs["single"])
    _wait(procs, logs)
    got = {name: json.loads(path.read_text()) for name, path in outs.items()}
    assert [got[p]["process"] for p in ("p0", "p1")] == [0, 1]
    for p in ("p0", "p1"):
        assert (got[p]["processes"], got[p]["devices"], got[p]["local_devices"]) == (2, 4, 2)
    assert (got["single"]["processes"], got["single"]["local_devices"]) == (1, 4)
    # each process holds its own trajectories' cache rows: 0-1 in process 0, 2-3 in process 1
    assert got["p0"]["local_cache_rows_start"] == [0]
    assert got["p1"]["local_cache_rows_start"] == [2]
    assert got["single"]["local_cache_rows_start"] == [0, 2]
    assert all(len(t) > 30 for t in got["single"]["tokens"])
    assert got["p0"]["tokens"] == got["p1"]["tokens"] == got["single"]["tokens"]
