"""Training with the base weights sharded over a model axis as well as rows over data (a forced
8-device CPU mesh) follows one device's loss curve, validation loss and adapters, in the agent
view and in the shared view. (Data-parallel alone: ``test_train_loop.py``.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from tests.test_train_toys import tiny_base, toy_samples
    from train.loop import RunOptions, TrainConfig, train
    assert jax.device_count() == 8, jax.devices()
    base = tiny_base()  # 4 heads, 2 kv heads, MLP width 96: all split in two
    samples = toy_samples(40)
    for role_samples in samples.values():  # the response header written by plan: a mixed view
        for sample in role_samples:
            sample["writers"] = ["env", "plan"]
    out = {}
    for view, meshes in (("agent", ((1, 1), (4, 2))), ("shared", ((1, 1), (2, 2)))):
        config = TrainConfig(epochs=1, max_steps=3, compute_dtype="float32", batch_size=8,
                             max_len=32, bucket_multiple=32, learning_rate=1e-2, warmup_steps=1,
                             data_view=view)
        for data, model in meshes:
            result = train(config, base, samples, toy_samples(8, offset=99),
                           RunOptions(progress=False, plot=False, mesh_data=data,
                                      mesh_model=model))
            out[f"{view} {data}x{model}"] = {
                "loss": [r["loss"] for r in result.history],
                "valid": result.validation[-1]["loss"],
                "adapters": [np.asarray(x).tolist() for x in jax.tree.leaves(result.adapters)]}
    json.dump(out, sys.stdout)
""")


def test_sharded_base_weights_follow_one_device():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    for view, mesh in (("agent", "4x2"), ("shared", "2x2")):
        one, sharded = out[f"{view} 1x1"], out[f"{view} {mesh}"]
        assert len(one["loss"]) == 3 and one["loss"][0] != one["loss"][-1]
        np.testing.assert_allclose(sharded["loss"], one["loss"], rtol=2e-5, err_msg=view)
        np.testing.assert_allclose(sharded["valid"], one["valid"], rtol=2e-5, err_msg=view)
        for a, b in zip(one["adapters"], sharded["adapters"]):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-4)
