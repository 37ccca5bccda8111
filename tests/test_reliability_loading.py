"""Weight files: NaN/Inf, integer tensors, checksums of our own exports, atomic saves, messages."""

from __future__ import annotations

import json
import os
import stat

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lragent_jax.config import ModelConfig
from lragent_jax.loading import (CheckpointError, EmbeddedModelMissing, embedded, load_gguf,
                                 load_hf_checkpoint, load_pretrained, save_gguf,
                                 save_hf_checkpoint)
from lragent_jax.loading.integrity import count_nonfinite
from tests.test_loading_hf import assert_params_equal, hf_tensors, random_params

CONFIG = ModelConfig.tiny()
KEY = "model.layers.1.mlp.up_proj.weight"


def _hf_folder(path, tensors, config=CONFIG):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    save_file(tensors, path / "model.safetensors")
    return path


def test_nan_and_inf_in_a_foreign_safetensors_file_are_counted_and_named(tmp_path):
    tensors = hf_tensors(CONFIG)
    tensors[KEY][0, :3] = np.nan
    tensors["model.norm.weight"][5] = np.inf
    with pytest.raises(CheckpointError) as info:
        load_hf_checkpoint(_hf_folder(tmp_path / "m", tensors))
    message = str(info.value)
    assert f"{KEY} (in model.safetensors) holds 3 non-finite value(s)" in message
    assert "model.norm.weight (in model.safetensors) holds 1 non-finite" in message


def test_integer_tensors_are_not_cast_into_weights(tmp_path):
    tensors = hf_tensors(CONFIG)
    tensors[KEY] = tensors[KEY].astype(np.int32)
    with pytest.raises(CheckpointError, match=f"{KEY} .in model.safetensors. is stored as int32, "
                                              "not floating point"):
        load_hf_checkpoint(_hf_folder(tmp_path / "m", tensors))


def test_overflow_on_conversion_is_named(tmp_path):
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf_tensors(CONFIG).items()}
    tensors[KEY][1, 1] = 1e6
    folder = _hf_folder(tmp_path / "m", tensors)
    load_hf_checkpoint(folder, jnp.float32)
    with pytest.raises(CheckpointError, match=f"{KEY}.*1 of 4608 values overflow float16"):
        load_hf_checkpoint(folder, jnp.float16)


def test_our_exports_are_checksummed_and_a_changed_byte_is_named(tmp_path):
    params = random_params(CONFIG)
    folder = save_hf_checkpoint(params, CONFIG, tmp_path / "m")
    assert_params_equal(params, load_hf_checkpoint(folder)[1])
    tensors = load_file(folder / "model.safetensors")
    data = bytearray((folder / "model.safetensors").read_bytes())
    size = int.from_bytes(data[:8], "little")
    start = 8 + size
    offsets = json.loads(bytes(data[8:start]))[KEY]["data_offsets"]
    data[start + offsets[0] + 5] ^= 0x01  # one low mantissa bit: a finite, wrong weight
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"cannot read {KEY} .in model.safetensors.: "
                                              "checksum mismatch"):
        load_hf_checkpoint(folder)
    assert len(tensors) == len(load_file(folder / "model.safetensors"))


def test_a_changed_config_json_is_caught_by_the_weights_checksum(tmp_path):
    folder = save_hf_checkpoint(random_params(CONFIG), CONFIG, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model.safetensors was saved with another model "
                                              "config than config.json now describes"):
        load_hf_checkpoint(folder)


def test_save_swaps_the_whole_folder_keeps_other_files_and_normal_permissions(tmp_path):
    folder = tmp_path / "m"
    save_hf_checkpoint(random_params(CONFIG), CONFIG, folder, max_shard_bytes=20_000)
    assert (folder / "model.safetensors.index.json").is_file()
    (folder / "tokenizer.json").write_text("{}")
    params = random_params(CONFIG, seed=1)
    save_hf_checkpoint(params, CONFIG, folder)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    assert_params_equal(params, load_hf_checkpoint(folder)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging left
    umask = os.umask(0)
    os.umask(umask)
    for path in (folder, *folder.iterdir()):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))


def test_a_save_that_fails_midway_leaves_the_previous_folder_whole(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    params = random_params(CONFIG)
    save_hf_checkpoint(params, CONFIG, folder, max_shard_bytes=20_000)
    import safetensors.numpy

    calls = []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(tensors, path, metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(random_params(CONFIG, seed=2), CONFIG, folder, max_shard_bytes=20_000)
    assert_params_equal(params, load_hf_checkpoint(folder)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_non_finite_params_are_not_saved(tmp_path):
    params = random_params(CONFIG)
    params["final_norm"] = params["final_norm"].at[0].set(jnp.nan)
    with pytest.raises(ValueError, match="refusing to save .*model.norm.weight .in the params to "
                                         "save. holds 1 non-finite"):
        save_hf_checkpoint(params, CONFIG, tmp_path / "m")
    with pytest.raises(ValueError, match="refusing to save .*holds 1 non-finite"):
        save_gguf(params, CONFIG, tmp_path / "m.gguf")
    assert not any(tmp_path.iterdir())


def test_gguf_without_checksums_is_still_checked_for_nan(tmp_path):
    path = save_gguf(random_params(CONFIG), CONFIG, tmp_path / "ok.gguf")
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(tmp_path / "nan.gguf", "llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "lragent.checksums"):
            continue
        value = field.contents()
        if isinstance(value, list):
            writer.add_array(name, value)
        else:
            writer.add_key_value(name, value, field.types[0])
    for tensor in reader.tensors:
        array = np.array(tensor.data).reshape(tuple(reversed([int(d) for d in tensor.shape])))
        if tensor.name == "blk.0.ffn_down.weight":
            array[0, :2] = np.nan
        writer.add_tensor(tensor.name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.down_proj.weight \(GGUF tensor "
                                              r"blk.0.ffn_down.weight in nan.gguf\) holds 2 "
                                              "non-finite"):
        load_gguf(tmp_path / "nan.gguf")


def test_gguf_checksums_cover_tensors_config_and_tokenizer(tmp_path):
    params = random_params(CONFIG)
    path = save_gguf(params, CONFIG, tmp_path / "m.gguf",
                     tokenizer_metadata={"tokenizer.ggml.model": "gpt2",
                                         "tokenizer.ggml.tokens": ["a", "b", "c"]})
    assert_params_equal(params, load_gguf(path)[1])
    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    data = bytearray(path.read_bytes())
    data[tensor.data_offset + 7] ^= 0x01
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"cannot read model.layers.1.self_attn.q_proj.weight "
                                              r"\(GGUF tensor blk.1.attn_q.weight in bad.gguf\): "
                                              "checksum mismatch"):
        load_gguf(bad)
    data = bytearray(path.read_bytes())
    where = bytes(data).index(b"\x01" + b"\x00" * 7 + b"b")  # token "b" (uint64 length first)
    data[where + 8] = ord("x")
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="the tokenizer metadata differs"):
        load_gguf(bad)


def test_gguf_features_that_would_be_ignored_are_refused(tmp_path):
    from lragent_jax.loading.gguf import config_from_metadata

    base = {"general.architecture": "llama", "llama.block_count": 2,
            "llama.embedding_length": 48, "llama.feed_forward_length": 96,
            "llama.attention.head_count": 4, "llama.vocab_size": 97}
    config_from_metadata(base, {})
    with pytest.raises(ValueError, match="sliding_window=4096 .sliding-window attention"):
        config_from_metadata({**base, "llama.attention.sliding_window": 4096}, {})
    with pytest.raises(ValueError, match="expert_count=8 .mixture-of-experts"):
        config_from_metadata({**base, "llama.expert_count": 8}, {})


def test_wrong_kind_of_file_is_named(tmp_path):
    lone = tmp_path / "model.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, lone)
    with pytest.raises(FileNotFoundError, match="is a single safetensors file; pass the HF "
                                                "checkpoint folder"):
        load_pretrained(lone)
    text = tmp_path / "weights.bin"
    text.write_bytes(b"PK\x03\x04 zip")
    with pytest.raises(CheckpointError, match=r"not a GGUF file: it starts with b'PK\\x03\\x04'"):
        load_pretrained(text)


def test_the_embedded_model_file_is_checked_against_its_install_record(tmp_path, monkeypatch):
    fake = tmp_path / embedded.FILENAME
    fake.write_bytes(b"GGUF" + b"\x00" * 64)
    import base64
    import hashlib

    good = base64.urlsafe_b64encode(hashlib.sha256(fake.read_bytes()).digest()).rstrip(b"=")
    monkeypatch.setattr(embedded, "_recorded_hashes", lambda: {fake.resolve(): good.decode()})
    assert embedded.verify_embedded_model(fake)
    monkeypatch.setattr(embedded, "_recorded_hashes", lambda: {fake.resolve(): "AAAA"})
    with pytest.raises(EmbeddedModelMissing, match="is damaged: its sha256 differs.*"
                                                   "pip install --force-reinstall"):
        embedded.verify_embedded_model(fake)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    assert not embedded.verify_embedded_model(other)  # not the packaged file: nothing to check


def test_count_nonfinite_is_exact_for_every_float_dtype():
    for dtype in (np.float32, np.float16, ml_dtypes.bfloat16, np.float64):
        array = np.random.default_rng(0).standard_normal((64, 33)).astype(dtype)
        array[3, 2], array[5, 1], array[9, 0] = np.nan, np.inf, -np.inf
        assert count_nonfinite(array) == count_nonfinite(array.T) == 3
        assert count_nonfinite(np.ones(7, dtype)) == 0
