"""HF checkpoint folders: layout, sharding, dtypes, config.json, and every kind of bad input."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from lragent_jax.config import ModelConfig, RopeScaling
from lragent_jax.loading import (CheckpointError, load_hf_checkpoint, param_shapes,
                                 save_hf_checkpoint)

VARIANTS = {
    "untied": ModelConfig.tiny(),
    "tied": ModelConfig.tiny(tie_embeddings=True),
    "qkv_bias": ModelConfig.tiny(qkv_bias=True, num_layers=3),
    "mha": ModelConfig.tiny(num_kv_heads=4, head_dim=8),
}


def random_params(config, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    # cast in numpy and device_put: jnp casts and jnp.asarray compile one program per shape
    return jax.tree.map(lambda shape: jax.device_put(rng.standard_normal(shape).astype(dtype)),
                        param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))


def cast(params, dtype):
    return jax.tree.map(lambda a: jax.device_put(np.asarray(a).astype(dtype)), params)


def assert_params_equal(expected, actual):
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    for (path, a), b in zip(jax.tree.leaves_with_path(expected), jax.tree.leaves(actual)):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def hf_tensors(config, seed=0):
    """A checkpoint in HF layout written from scratch: [out, in] weights, one key per layer."""
    rng = np.random.default_rng(seed)
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    tensors = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = (v, d)
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}."
        tensors.update({
            prefix + "input_layernorm.weight": (d,),
            prefix + "post_attention_layernorm.weight": (d,),
            prefix + "self_attn.q_proj.weight": (config.q_dim, d),
            prefix + "self_attn.k_proj.weight": (config.kv_dim, d),
            prefix + "self_attn.v_proj.weight": (config.kv_dim, d),
            prefix + "self_attn.o_proj.weight": (d, config.q_dim),
            prefix + "mlp.gate_proj.weight": (f, d),
            prefix + "mlp.up_proj.weight": (f, d),
            prefix + "mlp.down_proj.weight": (d, f),
        })
        if config.qkv_bias:
            tensors.update({prefix + "self_attn.q_proj.bias": (config.q_dim,),
                            prefix + "self_attn.k_proj.bias": (config.kv_dim,),
                            prefix + "self_attn.v_proj.bias": (config.kv_dim,)})
    return {key: rng.standard_normal(shape).astype(np.float32) for key, shape in tensors.items()}


def write_hf(folder, config, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


# ---- layout and round trips ----

@pytest.mark.parametrize("variant", ["untied", "tied", "qkv_bias"])
def test_hand_written_hf_checkpoint_maps_to_our_layout(tmp_path, variant):
    config = VARIANTS[variant]
    tensors = hf_tensors(config)
    _, params = load_hf_checkpoint(write_hf(tmp_path / "ckpt", config, tensors))
    params = jax.tree.map(np.asarray, params)
    np.testing.assert_array_equal(params["embed"], tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["final_norm"], tensors["model.norm.weight"])
    if config.tie_embeddings:
        assert "lm_head" not in params
    else:
        np.testing.assert_array_equal(params["lm_head"], tensors["lm_head.weight"].T)
    hf_names = {"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
                "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight",
                "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
                "down": "mlp.down_proj.weight", "attn_norm": "input_layernorm.weight",
                "mlp_norm": "post_attention_layernorm.weight"}
    if config.qkv_bias:
        hf_names.update(q_bias="self_attn.q_proj.bias", k_bias="self_attn.k_proj.bias",
                        v_bias="self_attn.v_proj.bias")
    assert set(params["layers"]) == set(hf_names)
    for leaf, name in hf_names.items():
        for layer in range(config.num_layers):
            stored = tensors[f"model.layers.{layer}.{name}"]
            expected = stored.T if stored.ndim == 2 else stored  # x @ W wants [in, out]
            np.testing.assert_array_equal(params["layers"][leaf][layer], expected,
                                          err_msg=f"{leaf} layer {layer}")
    expected_shapes = param_shapes(config)
    assert jax.tree.map(lambda a: a.shape, params) == expected_shapes


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_save_load_round_trip_is_exact(tmp_path, variant, dtype, sharded):
    config = VARIANTS[variant]
    params = random_params(config, jnp.dtype(dtype))
    folder = save_hf_checkpoint(params, config, tmp_path / "ckpt",
                                max_shard_bytes=8_000 if sharded else None)
    files = sorted(p.name for p in folder.iterdir())
    if sharded:
        assert "model.safetensors.index.json" in files and "model.safetensors" not in files
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and shards == [f for f in files if f.startswith("model-")]
        assert index["metadata"]["total_size"] == sum(
            a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    else:
        assert files == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["dtype"] == dtype
    loaded_config, loaded = load_hf_checkpoint(folder, dtype=jnp.dtype(dtype))
    assert loaded_config == config.replace(name="ckpt")
    assert_params_equal(params, loaded)


def test_bf16_checkpoint_upcasts_exactly_and_f32_downcasts_like_jax(tmp_path):
    config = VARIANTS["untied"]
    params = random_params(config, jnp.bfloat16)
    save_hf_checkpoint(params, config, tmp_path / "bf16")
    _, as_f32 = load_hf_checkpoint(tmp_path / "bf16", dtype=jnp.float32)
    assert_params_equal(cast(params, jnp.float32), as_f32)

    params32 = random_params(config, jnp.float32, seed=1)
    save_hf_checkpoint(params32, config, tmp_path / "f32")
    _, as_bf16 = load_hf_checkpoint(tmp_path / "f32", dtype="bfloat16")
    assert_params_equal(cast(params32, jnp.bfloat16), as_bf16)


def test_save_casts_on_the_way_out(tmp_path):
    config = VARIANTS["tied"]
    params = random_params(config)
    save_hf_checkpoint(params, config, tmp_path / "ckpt", dtype=jnp.bfloat16)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="numpy") as f:
        assert f.get_tensor("model.norm.weight").dtype == ml_dtypes.bfloat16
    _, loaded = load_hf_checkpoint(tmp_path / "ckpt", dtype=jnp.bfloat16)
    assert_params_equal(cast(params, jnp.bfloat16), loaded)


def test_resaving_with_other_sharding_leaves_no_stale_files(tmp_path):
    config = VARIANTS["untied"]
    params = random_params(config)
    save_hf_checkpoint(params, config, tmp_path / "ckpt", max_shard_bytes=8_000)
    save_hf_checkpoint(params, config, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json",
                                                                      "model.safetensors"]
    assert_params_equal(params, load_hf_checkpoint(tmp_path / "ckpt")[1])


def test_tied_model_ignores_a_stored_lm_head(tmp_path):
    config = VARIANTS["tied"]
    tensors = hf_tensors(config)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    _, params = load_hf_checkpoint(write_hf(tmp_path / "ckpt", config, tensors))
    assert "lm_head" not in params


def test_bare_decoder_keys_without_model_prefix(tmp_path):
    config = VARIANTS["untied"]
    tensors = hf_tensors(config)
    bare = {k.removeprefix("model."): a for k, a in tensors.items()}
    _, params = load_hf_checkpoint(write_hf(tmp_path / "ckpt", config, bare))
    np.testing.assert_array_equal(np.asarray(params["layers"]["k"])[1],
                                  tensors["model.layers.1.self_attn.k_proj.weight"].T)


def test_rotary_inv_freq_buffers_are_ignored(tmp_path):
    config = VARIANTS["untied"]
    tensors = hf_tensors(config)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    load_hf_checkpoint(write_hf(tmp_path / "ckpt", config, tensors))


# ---- config.json ----

@pytest.mark.parametrize("preset", ["smollm2_135m", "llama3_1_8b", "llama3_2_1b", "llama2_7b",
                                    "qwen2_0_5b", "mistral_7b"])
def test_config_json_round_trip(preset):
    config = ModelConfig.preset(preset)
    assert ModelConfig.from_hf_dict(config.to_hf_dict(), name=config.name) == config


def test_llama3_1_config_json_as_published():
    # The fields of meta-llama/Llama-3.1-8B-Instruct's config.json that matter here.
    published = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 128,
        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "vocab_size": 128256, "torch_dtype": "bfloat16",
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }
    config = ModelConfig.from_hf_dict(published, name="llama-3.1-8b")
    assert config == ModelConfig.llama3_1_8b()
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert ModelConfig.from_hf_dict(config.to_hf_dict(), name=config.name) == config


# ---- bad input ----

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found.*nowhere"):
        load_hf_checkpoint(tmp_path / "nowhere")


def test_missing_config_json(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path / "ckpt")


def test_corrupt_config_json(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_hf_checkpoint(tmp_path / "ckpt")


def test_unknown_architecture(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                    "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unknown architecture.*gpt2"):
        load_hf_checkpoint(folder)


def test_no_weights_file(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(VARIANTS["untied"].to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors or model.safetensors.index"):
        load_hf_checkpoint(folder)


def test_missing_shard_is_named_once(tmp_path):
    config = VARIANTS["untied"]
    folder = save_hf_checkpoint(random_params(config), config, tmp_path / "ckpt",
                                max_shard_bytes=8_000)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError) as info:
        load_hf_checkpoint(folder)
    assert info.value.problems == [f"missing shard file {shard}"]


def test_truncated_safetensors_file(tmp_path):
    config = VARIANTS["untied"]
    folder = save_hf_checkpoint(random_params(config), config, tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"unreadable safetensors file .*model\.safetensors"
                                              r" \(truncated or corrupt\?\)"):
        load_hf_checkpoint(folder)


def test_garbage_safetensors_file(tmp_path):
    config = VARIANTS["untied"]
    folder = save_hf_checkpoint(random_params(config), config, tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        load_hf_checkpoint(folder)


def test_wrong_shape_and_missing_key_are_listed_together(tmp_path):
    config = VARIANTS["untied"]
    tensors = hf_tensors(config)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((5, 7), np.float32)
    del tensors["model.layers.0.self_attn.v_proj.weight"]
    tensors["model.layers.0.mlp.experts.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as info:
        load_hf_checkpoint(write_hf(tmp_path / "ckpt", config, tensors))
    problems = info.value.problems
    assert len(problems) == 3, problems
    message = str(info.value)
    assert ("model.layers.1.mlp.up_proj.weight: expected shape (96, 48), found (5, 7) "
            "(in model.safetensors)") in message
    assert "missing key model.layers.0.self_attn.v_proj.weight (expected shape (32, 48))" \
        in message
    assert "unexpected key model.layers.0.mlp.experts.weight" in message


def test_untied_config_needs_lm_head_and_bias_config_needs_biases(tmp_path):
    tied = VARIANTS["tied"]
    tensors = hf_tensors(tied)
    write_hf(tmp_path / "ckpt", tied.replace(tie_embeddings=False, qkv_bias=True), tensors)
    with pytest.raises(CheckpointError) as info:
        load_hf_checkpoint(tmp_path / "ckpt")
    assert any("missing key lm_head.weight" in p for p in info.value.problems)
    assert sum("q_proj.bias" in p for p in info.value.problems) == tied.num_layers


def test_index_naming_a_key_its_shard_lacks(tmp_path):
    config = VARIANTS["untied"]
    folder = save_hf_checkpoint(random_params(config), config, tmp_path / "ckpt",
                                max_shard_bytes=8_000)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    moved = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][moved] = second
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"index lists {moved} in {second}, but that file "
                                              "lacks it"):
        load_hf_checkpoint(folder)


def test_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="unsupported parameter dtype.*int8"):
        load_hf_checkpoint(tmp_path, dtype=np.int8)


def test_save_rejects_params_that_do_not_match_the_config(tmp_path):
    config = VARIANTS["untied"]
    params = random_params(config)
    params["layers"]["q"] = jax.device_put(np.asarray(params["layers"]["q"])[:, :, :8])
    del params["final_norm"]
    with pytest.raises(ValueError, match="params do not match config") as info:
        save_hf_checkpoint(params, config, tmp_path / "ckpt")
    assert "layers/q: expected shape (2, 48, 64), found (2, 48, 8)" in str(info.value)
    assert "missing leaf final_norm (expected shape (48,))" in str(info.value)


def test_load_pretrained_hf_folder_carries_the_tokenizer(tmp_path):
    import tokenizers

    from lragent_jax.loading import load_pretrained

    config = VARIANTS["tied"]
    params = random_params(config)
    folder = save_hf_checkpoint(params, config, tmp_path / "ckpt")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {"<s>": 0, "</s>": 1, "hello": 2, "[UNK]": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>",
                                                              "eos_token": "</s>"}))
    loaded_config, loaded, tokenizer = load_pretrained(folder)
    assert loaded_config == config.replace(name="ckpt")
    assert_params_equal(params, loaded)
    assert tokenizer.encode("hello", add_bos=True) == [0, 2]
    assert tokenizer.eos_token_ids == (1,)
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_pretrained(tmp_path / "nowhere")
