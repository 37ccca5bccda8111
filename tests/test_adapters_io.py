"""Adapter export / import: PEFT-like layout, exact round trip, refusal of mismatched models."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lragent_jax import adapters_io
from lragent_jax.adapters_io import AdapterFileError, load_adapters, save_adapters
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.lora import adapter_shapes

SHIPPED = Path(adapters_io.__file__).parent / "assets" / "adapters" / "smollm2-135m-kb"


def _adapters(config, lora, seed=0):
    """Random A and nonzero B (numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    return {m: {leaf: (0.1 * rng.standard_normal(shape)).astype(np.float32)
                for leaf, shape in shapes.items()}
            for m, shapes in adapter_shapes(config, lora).items()}


def _rehash(folder, name):
    """Record a file's new sha256 in the manifest (as if it had been exported that way)."""
    from lragent_jax.loading.integrity import sha256_file

    manifest = json.loads((folder / "lragent_adapters.json").read_text())
    manifest["files"][name] = sha256_file(folder / name)
    (folder / "lragent_adapters.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("shared_a", [True, False])
def test_round_trip_is_exact(tmp_path, shared_a):
    config = ModelConfig.tiny()
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"), shared_a=shared_a)
    adapters = _adapters(config, lora)
    save_adapters(tmp_path / "out", adapters, lora, config, metadata={"note": "x"})
    loaded, loaded_lora = load_adapters(tmp_path / "out", config=config)
    assert loaded_lora == lora
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert adapters_io.adapter_files_metadata(tmp_path / "out") == {"note": "x"}


def test_layout_is_peft_like_with_unscaled_b(tmp_path):
    config = ModelConfig.tiny()
    lora = LoraConfig(rank=4, alpha=8.0, targets=("v", "gate"))
    adapters = _adapters(config, lora)
    out = save_adapters(tmp_path / "a", adapters, lora, config)
    manifest = json.loads((out / "lragent_adapters.json").read_text())
    assert manifest["agents"] == ["plan", "action", "reflect"] and manifest["shared_a"]
    assert manifest["base_model"]["fingerprint"] == adapters_io.config_fingerprint(config)
    peft = json.loads((out / "action" / "adapter_config.json").read_text())
    assert peft["r"] == 4 and peft["lora_alpha"] == 8.0 and peft["peft_type"] == "LORA"
    assert peft["target_modules"] == ["v_proj", "gate_proj"]
    tensors = load_file(out / "action" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_{}.weight"
    a, b = tensors[key.format("A")], tensors[key.format("B")]
    assert a.shape == (4, config.hidden_size) and b.shape == (config.kv_dim, 4)
    np.testing.assert_array_equal(a, np.asarray(adapters["v"]["a"][1]).T)
    np.testing.assert_array_equal(b * lora.scale, np.asarray(adapters["v"]["b"][1, 1]).T)
    assert len(tensors) == 2 * 2 * config.num_layers


def test_mismatched_base_model_is_refused_naming_both(tmp_path):
    config = ModelConfig.tiny()
    lora = LoraConfig(rank=4)
    save_adapters(tmp_path / "a", _adapters(config, lora), lora, config)
    other = ModelConfig.tiny(hidden_size=64, name="wider")
    with pytest.raises(AdapterFileError, match=r"trained for base model 'tiny'.*width 48.*"
                                               r"loaded base model is 'wider'.*width 64"):
        load_adapters(tmp_path / "a", config=other)


def test_shared_a_files_with_different_a_are_refused(tmp_path):
    config = ModelConfig.tiny()
    lora = LoraConfig(rank=4, targets=("q",))
    out = save_adapters(tmp_path / "a", _adapters(config, lora), lora, config)
    path = out / "reflect" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, path)
    _rehash(out, "reflect/adapter_model.safetensors")  # a consistent export, only A differs
    with pytest.raises(AdapterFileError, match=r"agent 'reflect' has a different A than 'plan' "
                                               r"for module 'q' in layers \[1\]"):
        load_adapters(out, config=config)


def test_missing_or_corrupt_files_are_named(tmp_path):
    config = ModelConfig.tiny()
    lora = LoraConfig(rank=4, targets=("q",))
    out = save_adapters(tmp_path / "a", _adapters(config, lora), lora, config)
    (out / "action" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    (out / "plan" / "adapter_config.json").unlink()
    with pytest.raises(AdapterFileError) as info:
        load_adapters(out, config=config)
    message = str(info.value)
    assert "plan/adapter_config.json: missing" in message
    assert "action/adapter_model.safetensors: unreadable" in message
    with pytest.raises(AdapterFileError, match="lragent_adapters.json is missing"):
        load_adapters(out / "plan", config=config)
    with pytest.raises(AdapterFileError, match="adapter folder not found"):
        load_adapters(tmp_path / "none", config=config)


def test_export_never_overwrites_a_foreign_folder(tmp_path):
    config = ModelConfig.tiny()
    lora = LoraConfig(rank=4, targets=("q",))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(AdapterFileError, match="not an adapter export"):
        save_adapters(tmp_path / "mine", _adapters(config, lora), lora, config)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging left behind


@pytest.mark.skipif(not (SHIPPED / "lragent_adapters.json").is_file(),
                    reason="shipped adapters not built yet")
@pytest.mark.parametrize("name", ["smollm2-135m-kb", "smollm2-135m-scienceqa"])
def test_shipped_adapters_fit_smollm2_and_refuse_llama(name):
    folder = SHIPPED.parent / name
    loaded, lora = load_adapters(folder, config=ModelConfig.smollm2_135m())
    assert lora.shared_a and lora.agents == ("plan", "action", "reflect")
    assert "k" not in lora.targets
    # every role's B is trained (nonzero), and the manifest says how the set was made
    for i, _ in enumerate(lora.agents):  # B: (layers, agents, rank, out)
        assert all(np.abs(np.asarray(leaves["b"][:, i], np.float32)).max() > 0
                   for leaves in loaded.values())
    meta = json.loads((folder / "lragent_adapters.json").read_text())["metadata"]
    assert meta["command"].startswith("python -m train") and meta["validation"]["step"] > 0
    with pytest.raises(AdapterFileError, match="loaded base model is 'llama-3.1-8b'"):
        load_adapters(folder, config=ModelConfig.llama3_1_8b())
