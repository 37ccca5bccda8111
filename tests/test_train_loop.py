"""Training: loss goes down, shared-A variants, parameter counts, kill-and-resume, mismatches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from lragent_jax.lora import count_parameters, expected_parameter_count, init_adapters
from tests.test_train_toys import tiny_base, toy_samples
from train.checkpoint import CheckpointMismatch
from train.data import DataError
from train.loop import RunOptions, TrainConfig, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(batch_size=8, max_len=32, bucket_multiple=32, learning_rate=1e-2, warmup_steps=1)


def quiet(**kwargs) -> RunOptions:
    return RunOptions(progress=False, plot=False, **kwargs)


def test_loss_decreases_within_a_few_steps():
    base = tiny_base()
    config = TrainConfig(epochs=1, **FAST)  # bf16 compute, float32 adapters: the defaults
    result = train(config, base, toy_samples(48), toy_samples(8, offset=500), quiet())
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 18
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    assert result.validation and result.validation[-1]["loss"] < losses[0]
    assert set(result.validation[-1]["exact_match_per_role"]) == {"plan", "action", "reflect"}
    for leaves in result.adapters.values():
        assert leaves["a"].dtype == np.float32 and leaves["b"].dtype == np.float32


def test_shared_a_parameter_count_is_a_plus_n_b():
    base = tiny_base(hidden_size=64)  # q: 64 -> 4 heads x 16 = 64, so |A| = |B|
    shared = TrainConfig(targets=("q",)).lora
    independent = TrainConfig(targets=("q",), variant="independent").lora
    key = jax.random.key(0)
    n_shared = count_parameters(init_adapters(key, base.config, shared))
    n_independent = count_parameters(init_adapters(key, base.config, independent))
    size_a = base.config.num_layers * 64 * 8
    assert n_shared == size_a + 3 * size_a == expected_parameter_count(base.config, shared)
    assert n_independent == 3 * (2 * size_a) == expected_parameter_count(base.config,
                                                                         independent)
    assert 1 - n_shared / n_independent == pytest.approx(1 / 3)  # 33% fewer for 3 agents


def _stage_values(adapters):
    return {m: {k: np.asarray(v) for k, v in leaves.items()} for m, leaves in adapters.items()}


def test_frozen_variant_keeps_a_after_the_first_role(tmp_path):
    base = tiny_base()
    config = TrainConfig(variant="frozen", epochs=1, max_steps=3, **FAST)
    samples = toy_samples(24)
    after_first = _stage_values(train(config, base, samples, None, quiet(
        out_dir=tmp_path / "a", stop_after=3)).adapters)
    final = train(config, base, samples, None, quiet(out_dir=tmp_path / "b"))
    assert final.progress.global_step == 6
    for module, leaves in _stage_values(final.adapters).items():
        first = after_first[module]
        np.testing.assert_array_equal(leaves["a"], first["a"])  # A frozen in phase 2
        np.testing.assert_array_equal(leaves["b"][:, 0], first["b"][:, 0])  # plan's B done
        assert not first["b"][:, 1:].any()  # the others did not move in phase 1
        assert leaves["b"][:, 1:].any()  # ... and trained in phase 2
        assert first["b"][:, 0].any()
    init_a = np.asarray(init_adapters(jax.random.key(0), base.config, config.lora)["q"]["a"])
    assert not np.array_equal(after_first["q"]["a"], init_a)  # phase 1 trained A


@pytest.mark.parametrize("variant", ["joint", "frozen"])
def test_kill_and_resume_gives_identical_parameters(tmp_path, variant):
    base = tiny_base()
    config = TrainConfig(variant=variant, epochs=2, max_steps=3, **FAST)
    samples, valid = toy_samples(24), toy_samples(4, offset=300)
    straight = train(config, base, samples, valid, quiet(out_dir=tmp_path / "straight"))
    run = tmp_path / "killed"
    # killed after step 5; the last checkpoint is step 4 (save_every=2), so step 5 is redone
    stopped = train(config, base, samples, valid, quiet(out_dir=run, save_every=2, stop_after=5))
    assert stopped.interrupted and stopped.export_dir is None
    resumed = train(config, base, samples, valid, quiet(out_dir=run, save_every=2, resume=True))
    assert resumed.progress.finished and resumed.progress.global_step == straight.progress.global_step
    for a, b in zip(jax.tree.leaves(straight.adapters), jax.tree.leaves(resumed.adapters)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r["event"] == "step"]
    assert [r["step"] for r in steps if r["event"] == "step"] == list(range(1, len(losses) + 1))
    assert losses == [r["loss"] for r in straight.history]
    assert (run / "adapters" / "lragent_adapters.json").is_file()


def test_resume_refuses_another_config_or_base_model(tmp_path):
    base = tiny_base()
    config = TrainConfig(epochs=1, max_steps=2, **FAST)
    train(config, base, toy_samples(16), None, quiet(out_dir=tmp_path))
    other_rank = TrainConfig(epochs=1, max_steps=2, rank=4, **FAST)
    with pytest.raises(CheckpointMismatch, match="adapter config differ.*rank: checkpoint 8 vs now 4"):
        train(other_rank, base, toy_samples(16), None, quiet(out_dir=tmp_path, resume=True))
    wider = tiny_base(hidden_size=64)
    with pytest.raises(CheckpointMismatch, match="base model: the checkpoint was made for 'tiny'"):
        train(config, wider, toy_samples(16), None, quiet(out_dir=tmp_path, resume=True))


def test_empty_and_all_overlong_datasets_fail_clearly():
    base = tiny_base()
    with pytest.raises(DataError, match="no training samples: the dataset is empty"):
        train(TrainConfig(**FAST), base, {"plan": []}, None, quiet())
    with pytest.raises(DataError, match="left after dropping 72 longer than --max-len 8"):
        train(TrainConfig(**{**FAST, "max_len": 8}), base, toy_samples(24), None, quiet())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="adapters on k cannot be shared"):
        TrainConfig(targets=("q", "k"))
    with pytest.raises(ValueError, match="variant must be one of"):
        TrainConfig(variant="shared")
    with pytest.raises(ValueError, match="the frozen variant needs at least two agents"):
        TrainConfig(variant="frozen", agents=("solo",))


DATA_PARALLEL = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from tests.test_train_toys import tiny_base, toy_samples
    from train.loop import RunOptions, TrainConfig, train
    assert jax.device_count() == 8, jax.devices()
    base = tiny_base()
    config = TrainConfig(epochs=1, max_steps=4, compute_dtype="float32", batch_size=8,
                         max_len=32, bucket_multiple=32, learning_rate=1e-2, warmup_steps=1)
    out = {}
    for devices in (1, 8):
        result = train(config, base, toy_samples(40), toy_samples(8, offset=99),
                       RunOptions(progress=False, plot=False, mesh_data=devices))
        out[devices] = {"loss": [r["loss"] for r in result.history],
                        "valid": result.validation[-1]["loss"],
                        "adapters": [np.asarray(x).tolist() for x in jax.tree.leaves(result.adapters)]}
    try:
        train(TrainConfig(batch_size=6), base, toy_samples(4), None, RunOptions(progress=False))
    except ValueError as err:
        out["batch_error"] = str(err)
    json.dump(out, sys.stdout)
""")


def test_data_parallel_on_8_cpu_devices_matches_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    one, eight = out["1"], out["8"]
    assert len(one["loss"]) == 4
    assert "batch size 6 must be a multiple of the data-parallel size 8" in out["batch_error"]
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=2e-5)
    np.testing.assert_allclose(eight["valid"], one["valid"], rtol=2e-5)
    for a, b in zip(one["adapters"], eight["adapters"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-4)

