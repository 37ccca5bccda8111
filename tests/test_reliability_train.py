"""Training: every numeric setting checked, NaN stops the run unsaved, one writer per run folder,
records before checkpoints, validation bounded for short runs and checkpointed before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from tests.test_train_loop import FAST, REPO, quiet
from tests.test_train_toys import tiny_base, toy_samples
from train.checkpoint import Checkpointer, CheckpointMismatch, RunFolderLocked, RunLock
from train.loop import (NonFiniteTraining, ProgressBar, RunOptions, TrainConfig,
                        validation_subset, train)


@pytest.mark.parametrize("field, value, message", [
    ("clip_norm", -1.0, r"clip_norm must be a number in \(0, inf\); got -1.0"),
    ("min_lr_ratio", -3.0, r"min_lr_ratio must be a number in \[0, 1\]; got -3.0"),
    ("weight_decay", -5.0, r"weight_decay must be a number in \[0, inf\); got -5.0"),
    ("warmup_steps", -5, r"warmup_steps must be an int in \[0, inf\); got -5"),
    ("warmup_ratio", 2.0, r"warmup_ratio must be a number in \[0, 1\); got 2.0"),
    ("adam_b1", 1.0, r"adam_b1 must be a number in \[0, 1\); got 1.0"),
    ("adam_b2", -0.1, r"adam_b2 must be a number in \[0, 1\); got -0.1"),
    ("learning_rate", float("nan"), r"learning_rate must be a number in \(0, inf\); got nan"),
    ("epochs", True, r"epochs must be an int in \[1, inf\); got True"),
    ("batch_size", 0, r"batch_size must be an int in \[1, inf\); got 0"),
    ("seed", -1, r"seed must be an int in \[0, inf\); got -1"),
    ("bucket_ratio", 1.0, r"bucket_ratio must be a number in \(1, inf\); got 1.0"),
    ("max_steps", 0, r"max_steps must be an int in \[1, inf\); got 0"),
    ("rank", 2.5, r"rank must be an int in \[1, inf\); got 2.5"),
])
def test_train_config_names_the_bad_value_and_the_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field, value, message", [
    ("eval_batch_size", 0, r"eval_batch_size must be an int in \[1, inf\); got 0"),
    ("save_every", 0, r"save_every must be an int in \[1, inf\); got 0"),
    ("valid_samples", -1, r"valid_samples must be an int in \[0, inf\); got -1"),
    ("stop_after", 0, r"stop_after must be an int in \[1, inf\); got 0"),
    ("export_dtype", "int8", "export dtype must be one of"),
    ("overwrite", True, "resume and overwrite exclude each other"),
])
def test_run_options_name_the_bad_value(field, value, message):
    extra = {"resume": True} if field == "overwrite" else {}
    with pytest.raises(ValueError, match=message):
        RunOptions(**{field: value}, **extra)


def _records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_nan_base_weights_stop_at_the_first_step_with_nothing_saved(tmp_path):
    base = tiny_base()
    base.params["layers"]["q"][0, 0, 0] = np.nan
    with pytest.raises(NonFiniteTraining, match=r"step 1 .*loss nan.*training stopped before "
                                                r"saving or exporting this step \(no checkpoint "
                                                r"was written\)"):
        train(TrainConfig(epochs=1, max_steps=3, **FAST), base, toy_samples(16), None,
              quiet(out_dir=tmp_path, save_every=1))
    assert not list((tmp_path / "checkpoints").glob("[0-9]*")) and not (tmp_path / "adapters").exists()
    assert _records(tmp_path)[-1]["event"] == "error"


def test_a_diverging_run_keeps_its_last_finite_checkpoint_and_exports_nothing(tmp_path):
    # lr 1e38: the first updates are finite, then the adapters overflow
    config = TrainConfig(epochs=1, max_steps=8, **{**FAST, "learning_rate": 1e38})
    with pytest.raises(NonFiniteTraining) as info:
        train(config, tiny_base(), toy_samples(40), None, quiet(out_dir=tmp_path, save_every=1))
    bad = int(str(info.value).split()[1])
    assert bad > 1 and f"the newest checkpoint (step {bad - 1}) holds finite adapters" in str(
        info.value)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").glob("[0-9]*"))
    assert steps[-1] == bad - 1 and not (tmp_path / "adapters").exists()
    assert Checkpointer(tmp_path / "checkpoints").verify(bad - 1) is None


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from train.checkpoint import RunLock
    RunLock(sys.argv[1], "python -m train --the-other-run").acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_second_writer_is_refused_and_a_dead_owners_lock_is_taken_over(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (tmp_path / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n')
        with pytest.raises(RunFolderLocked, match=rf"in use by another training run \(pid "
                                                  rf"{holder.pid} on .*--the-other-run\)"):
            train(TrainConfig(**FAST), tiny_base(), toy_samples(8), None,
                  quiet(out_dir=tmp_path, overwrite=True))
        assert (tmp_path / "metrics.jsonl").read_text().startswith('{"event": "start"')
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path, "me"):  # the kernel dropped the dead owner's lock
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()


def test_a_fresh_run_never_mixes_with_an_earlier_runs_results(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"already holds the results of a run \(metrics.jsonl\): "
                                         "pass --resume"):
        train(TrainConfig(**FAST), tiny_base(), toy_samples(8), None, quiet(out_dir=tmp_path))


def test_the_record_of_a_checkpointed_step_survives_a_kill_right_after_it(tmp_path):
    config = TrainConfig(epochs=1, max_steps=5, **FAST)
    straight = train(config, tiny_base(), toy_samples(48), None, quiet(out_dir=tmp_path / "a"))
    # killed right after the checkpoint of step 2: its record must be on disk already
    train(config, tiny_base(), toy_samples(48), None,
          quiet(out_dir=tmp_path / "b", save_every=2, stop_after=2))
    assert [r["step"] for r in _records(tmp_path / "b") if r["event"] == "step"] == [1, 2]
    train(config, tiny_base(), toy_samples(48), None,
          quiet(out_dir=tmp_path / "b", save_every=2, resume=True))
    steps = [r for r in _records(tmp_path / "b") if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in steps] == [r["loss"] for r in straight.history]


def test_short_runs_validate_on_a_bounded_sample_of_every_role(tmp_path):
    config = TrainConfig(epochs=1, max_steps=2, **FAST)  # 2 steps x 8 samples
    result = train(config, tiny_base(), toy_samples(48), toy_samples(40, offset=300), quiet())
    counts = result.validation[-1]["samples_per_role"]
    assert sum(counts.values()) == 8 and min(counts.values()) >= 2  # half of 16, all roles
    assert result.validation[-1]["samples_available"] == 120
    full = train(TrainConfig(epochs=1, **FAST), tiny_base(), toy_samples(48),
                 toy_samples(8, offset=300), quiet())
    assert sum(full.validation[-1]["samples_per_role"].values()) == 24  # a full run: all
    none = train(config, tiny_base(), toy_samples(48), toy_samples(8, offset=300),
                 quiet(valid_samples=0))
    assert none.validation == []


def test_validation_subset_takes_every_role_in_turn():
    from train.data import Example

    examples = [Example(np.zeros(3, np.int32), 1, agent, "r") for agent in (0, 0, 0, 0, 1, 2, 2)]
    assert validation_subset(examples, 4) == [0, 1, 4, 5]
    assert validation_subset(examples, None) == list(range(7))
    assert validation_subset(examples, 0) == []


def test_an_interrupted_validation_is_redone_once_on_resume(tmp_path, monkeypatch):
    import train.loop as loop

    config = TrainConfig(epochs=2, max_steps=3, **FAST)
    samples, valid = toy_samples(24), toy_samples(4, offset=300)
    straight = train(config, tiny_base(), samples, valid, quiet(out_dir=tmp_path / "a"))
    real = loop._validate

    def stopped_inside(*args, **kwargs):
        stop = next(a for a in args if isinstance(a, loop.StopSignals))
        stop.requested = "SIGINT"  # as if Ctrl-C came during validation
        return None

    monkeypatch.setattr(loop, "_validate", stopped_inside)
    first = train(config, tiny_base(), samples, valid, quiet(out_dir=tmp_path / "b"))
    assert first.stopped_by == "SIGINT" and first.last_checkpoint == 3  # saved before validating
    monkeypatch.setattr(loop, "_validate", real)
    resumed = train(config, tiny_base(), samples, valid, quiet(out_dir=tmp_path / "b", resume=True))
    records = _records(tmp_path / "b")
    assert [r["step"] for r in records if r["event"] == "validation"] == [3, 6]
    assert [r["loss"] for r in resumed.validation] == [r["loss"] for r in straight.validation]
    for a, b in zip(jax.tree.leaves(straight.adapters), jax.tree.leaves(resumed.adapters)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_refuses_other_weights_of_the_same_shape(tmp_path):
    config = TrainConfig(epochs=1, max_steps=2, **FAST)
    train(config, tiny_base(), toy_samples(16), None, quiet(out_dir=tmp_path))
    other = tiny_base()
    other.params["embed"] = other.params["embed"] * 1.5
    with pytest.raises(CheckpointMismatch, match="same architecture, but the checkpoint was made "
                                                 "on other weights"):
        train(config, other, toy_samples(16), None, quiet(out_dir=tmp_path, resume=True))


def test_progress_bar_shows_time_left(capsys, monkeypatch):
    bar = ProgressBar(True)
    clock = iter([0.0, 10.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    bar.update("x", 1, 11, force=True)
    bar.update("x", 2, 11, force=True)
    assert "2/11 10s ~1m30s left x" in capsys.readouterr().err
