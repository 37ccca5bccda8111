"""Fault injection: training runs killed (SIGKILL) at chosen and at random points, inside
checkpoint saves, validation and the adapter export, then resumed; Ctrl-C; damaged checkpoints;
bytes flipped in weight, adapter and checkpoint files.

What must hold: a resumed run ends with adapters bit-identical to an uninterrupted run and a
``metrics.jsonl`` with every step exactly once; a damaged file is named in a clear error (or
skipped, for a checkpoint with an older intact one), never loaded as NaN or as other values.

The killed runs are subprocesses (``python -m train``, tiny model) sharing a persistent XLA
compilation cache, so only the first one compiles; the resumes run in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lragent_jax.adapters_io import AdapterFileError, load_adapters, save_adapters
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.loading import CheckpointError, load_gguf, load_hf_checkpoint, save_gguf
from lragent_jax.loading import save_hf_checkpoint
from tests.test_adapters_io import _adapters
from tests.test_loading_hf import random_params
from tests.test_train_loop import REPO
from tests.test_train_toys import toy_samples, write_role_dir
from train.cli import main

ROLES = ("plan", "action", "reflect")


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    # 54 training samples / 8 = 7 steps per epoch, 14 in all; checkpoints every 2 steps and at
    # each epoch's end (7, 14); validation: 3 batches per epoch
    return ["--model", "tiny", "--dtype", "float32", "--data", str(data), "--valid-fraction",
            "0.25", "--max-len", "64", "--bucket-multiple", "64", "--batch-size", "8",
            "--eval-batch-size", "8", "--epochs", "2", "--lr", "1e-2", "--save-every", "2",
            "--keep", "2", "--no-progress", "--no-plot", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = write_role_dir(root / "data", toy_samples(24))
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(root / "xla-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    reference = root / "reference"
    assert main(_args(data, reference)) == 0
    return {"root": root, "data": data, "env": env, "reference": _outcome(reference)}


def _outcome(out: Path) -> dict:
    """What must equal an uninterrupted run's: adapter tensors, step losses, validation."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"adapters": {r: (out / "adapters" / r / "adapter_model.safetensors").read_bytes()
                         for r in ROLES},
            "steps": [(r["step"], r["loss"], r["grad_norm"]) for r in records
                      if r["event"] == "step"],
            "validation": [(r["step"], r["loss"], r["exact_match_per_role"]) for r in records
                           if r["event"] == "validation"],
            "events": [r["event"] for r in records if r["event"] != "step"]}


def _run_victim(setup, out: Path, failpoint: str | None = None, kill_after: float | None = None,
                extra: tuple[str, ...] = ()) -> int:
    env = dict(setup["env"])
    if failpoint:
        env["LRAGENT_FAILPOINT"] = failpoint
    proc = subprocess.Popen([sys.executable, "-m", "train", *_args(setup["data"], out, *extra)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    if kill_after is not None:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.is_file() and '"event": "step"' in metrics.read_text():
                break
            time.sleep(0.02)
        time.sleep(kill_after)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
    return proc.returncode


def _resume_and_compare(setup, out: Path, capsys) -> str:
    capsys.readouterr()
    assert main(_args(setup["data"], out, "--resume")) == 0
    err = capsys.readouterr().err
    outcome = _outcome(out)
    reference = setup["reference"]
    assert outcome["adapters"] == reference["adapters"]  # bit for bit
    assert [s for s, _, _ in outcome["steps"]] == list(range(1, 15))  # each step exactly once
    assert outcome["steps"] == reference["steps"]
    assert outcome["validation"] == reference["validation"]
    assert outcome["events"] == ["start", "validation", "validation", "end"]
    leftovers = [p.name for p in [*out.iterdir(), *(out / "checkpoints").iterdir()]
                 if "staging" in p.name or "tmp" in p.name]
    assert not leftovers
    return err


# (failpoint, its n-th pass): the places a crash hurts most
KILL_POINTS = [
    ("train.step:3", "after a step, before its record"),
    ("train.record:4", "after a record, before the checkpoint that includes it"),
    ("checkpoint.written:2", "orbax done, checksums not yet written"),
    ("checkpoint.done:4", "right after the epoch-end checkpoint"),
    ("validation.batch:2", "inside validation"),
    ("export.agent:2", "inside the adapter export"),
    ("export.swap:1", "export staged, not yet switched in"),
]


@pytest.mark.parametrize("failpoint, where", KILL_POINTS, ids=[k for k, _ in KILL_POINTS])
def test_sigkill_at_a_chosen_point_then_resume_is_exact(setup, failpoint, where, capsys):
    out = setup["root"] / failpoint.replace(":", "-")
    assert _run_victim(setup, out, failpoint) == -signal.SIGKILL, f"never reached: {where}"
    err = _resume_and_compare(setup, out, capsys)
    if failpoint.startswith("checkpoint.written"):  # that checkpoint is incomplete: set aside
        assert "skipping damaged checkpoint" in err and "lragent_checksums.json is missing" in err


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_moment_then_resume_is_exact(setup, seed, capsys):
    out = setup["root"] / f"random-{seed}"
    _run_victim(setup, out, kill_after=float(np.random.default_rng(seed).uniform(0.0, 1.5)))
    _resume_and_compare(setup, out, capsys)


def test_ctrl_c_stops_within_seconds_and_the_run_resumes_exactly(setup, capsys):
    extra = ("--epochs", "8", "--save-every", "1000")
    reference = setup["root"] / "sigint-reference"
    assert main(_args(setup["data"], reference, *extra)) == 0
    out = setup["root"] / "sigint"
    proc = subprocess.Popen([sys.executable, "-m", "train", *_args(setup["data"], out, *extra)],
                            cwd=REPO, env=setup["env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file()
                                       and metrics.read_text().count('"event": "step"') >= 3):
        time.sleep(0.02)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - sent < 10, "Ctrl-C took too long"
    assert proc.returncode == 130, err[-2000:]
    assert "SIGINT: stopping after the current step" in err
    assert "continue with: python -m train" in err and "--resume" in err
    assert main(_args(setup["data"], out, *extra, "--resume")) == 0
    assert _outcome(out)["adapters"] == _outcome(reference)["adapters"]
    steps = [s for s, _, _ in _outcome(out)["steps"]]
    assert steps == list(range(1, len(steps) + 1)) == [s for s, _, _ in
                                                       _outcome(reference)["steps"]]


def _steps_of(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.parametrize("seed", [0, 1])
def test_a_damaged_latest_checkpoint_is_skipped_for_the_previous_one(setup, seed, capsys):
    out = setup["root"] / f"damaged-{seed}"
    assert main(_args(setup["data"], out, "--stop-after", "6")) == 0
    assert _steps_of(out) == [4, 6]
    rng = np.random.default_rng(seed)
    files = sorted(p for p in (out / "checkpoints" / "6").rglob("*") if p.is_file())
    victim = files[rng.integers(len(files))]
    data = bytearray(victim.read_bytes())
    data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
    victim.write_bytes(bytes(data))
    err = _resume_and_compare(setup, out, capsys)
    name = str(victim.relative_to(out / "checkpoints" / "6"))
    assert "skipping damaged checkpoint" in err and name in err, err
    assert "resumed from step 4" in err
    assert (out / "damaged_checkpoints").is_dir()  # set aside, not deleted


def test_when_every_checkpoint_is_damaged_the_error_says_what_to_do(setup, capsys):
    out = setup["root"] / "all-damaged"
    assert main(_args(setup["data"], out, "--stop-after", "4")) == 0
    for step in _steps_of(out):
        (out / "checkpoints" / str(step) / "lragent_checksums.json").write_text("{")
    capsys.readouterr()
    assert main(_args(setup["data"], out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint in" in err and "start afresh with --overwrite" in err


# ---- flipped bytes in files read back: an error naming the file, or exactly the same values

def _flip(path: Path, rng) -> None:
    data = bytearray(path.read_bytes())
    data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(data))


def _same_tree(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
        zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_flipped_bytes_in_weight_files_are_named_never_loaded(tmp_path, kind):
    config = ModelConfig.tiny()
    params = random_params(config)
    outcomes = {"error": 0, "same": 0}
    for seed in range(40):
        rng = np.random.default_rng(seed)
        if kind == "safetensors":
            folder = save_hf_checkpoint(params, config, tmp_path / f"m{seed}")
            victim = folder / ("model.safetensors" if rng.random() < 0.8 else "config.json")
            load = lambda: load_hf_checkpoint(folder)  # noqa: E731
        else:
            victim = save_gguf(params, config, tmp_path / f"m{seed}.gguf")
            load = lambda: load_gguf(victim)[:2]  # noqa: E731
        _flip(victim, rng)
        try:
            loaded_config, loaded = load()
        except (CheckpointError, ValueError, FileNotFoundError) as err:
            assert victim.name in str(err) or str(victim.parent) in str(err), str(err)
            outcomes["error"] += 1
            continue
        # loaded: the flip hit bytes that carry nothing (padding, a display name)
        assert _same_tree(params, loaded) and loaded_config.to_hf_dict() == config.to_hf_dict()
        outcomes["same"] += 1
    assert outcomes["error"] >= 30, outcomes


def test_flipped_bytes_in_adapter_files_are_named_never_loaded(tmp_path):
    config = ModelConfig.tiny()
    lora = LoraConfig(rank=4, targets=("q", "v"))
    params = random_params(config)
    adapters = _adapters(config, lora)
    errors = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        folder = save_adapters(tmp_path / f"a{seed}", adapters, lora, config, base_params=params)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        victim = files[rng.integers(len(files))]
        _flip(victim, rng)
        try:
            loaded, loaded_lora = load_adapters(folder, config=config, params=params)
        except AdapterFileError as err:
            assert victim.name in str(err) or str(folder) in str(err), str(err)
            errors += 1
            continue
        assert loaded_lora == lora and _same_tree(
            jax.tree.map(np.asarray, adapters), jax.tree.map(np.asarray, loaded))
    assert errors >= 20


KILL_IN_SWAP = """
import sys
import numpy as np
from lragent_jax.adapters_io import save_adapters
from lragent_jax.config import LoraConfig, ModelConfig
from tests.test_adapters_io import _adapters
config, lora = ModelConfig.tiny(), LoraConfig(rank=4, targets=("q",))
save_adapters(sys.argv[1], _adapters(config, lora, seed=int(sys.argv[2])), lora, config)
"""


def test_a_kill_inside_the_folder_switch_leaves_a_whole_export(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    folder = tmp_path / "adapters"
    config, lora = ModelConfig.tiny(), LoraConfig(rank=4, targets=("q",))
    save_adapters(folder, _adapters(config, lora, seed=0), lora, config)
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SWAP, str(folder), "1"], cwd=REPO,
                          env={**env, "LRAGENT_FAILPOINT": "swap.exchanged"}, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    loaded, _ = load_adapters(folder, config=config)  # the new export, whole
    np.testing.assert_array_equal(np.asarray(loaded["q"]["a"]),
                                  _adapters(config, lora, seed=1)["q"]["a"])
    assert any("staging" in p.name for p in tmp_path.iterdir())  # the old one, left by the kill
    save_adapters(folder, _adapters(config, lora, seed=2), lora, config)
    assert [p.name for p in tmp_path.iterdir()] == ["adapters"]  # cleaned by the next writer
