"""Config fields: every bad value refused with its name and the allowed range."""

from __future__ import annotations

import numpy as np
import pytest

from lragent_jax.config import LoraConfig, ModelConfig, RopeScaling


def test_agent_index_accepts_numpy_integers_and_refuses_bools_and_other_types():
    lora = LoraConfig()
    assert lora.agent_index(np.int64(2)) == 2 and isinstance(lora.agent_index(np.int32(1)), int)
    assert lora.agent_index("action") == 1
    with pytest.raises(ValueError, match=r"agent True is a bool.*'plan', 'action', 'reflect'"):
        lora.agent_index(True)
    with pytest.raises(ValueError, match=r"agent index 3 out of range; allowed: 0\.\.2 \(plan, "
                                         r"action, reflect\)"):
        lora.agent_index(np.int64(3))
    with pytest.raises(ValueError, match="agent index -1 out of range"):
        lora.agent_index(-1)
    with pytest.raises(ValueError, match="agent 1.5 of type float is not an agent name or index"):
        lora.agent_index(1.5)
    with pytest.raises(ValueError, match=r"unknown agent 'critic'; known agents"):
        lora.agent_index("critic")


@pytest.mark.parametrize("fields, message", [
    (dict(rank=True), "LoRA rank must be a positive int; got True"),
    (dict(rank=0), "LoRA rank must be a positive int; got 0"),
    (dict(alpha=float("nan")), "LoRA alpha must be a finite number > 0; got nan"),
    (dict(alpha=-1.0), "LoRA alpha must be a finite number > 0; got -1.0"),
    (dict(alpha="16"), "LoRA alpha must be a finite number > 0; got '16'"),
    (dict(agents=(1, 2)), r"agent names must be non-empty strings; got \[1, 2\]"),
    (dict(agents=("plan", "")), "agent names must be non-empty strings"),
    (dict(agents="plan"), "not one string"),
    (dict(shared_a=1), "shared_a must be a bool; got 1"),
])
def test_lora_config_refuses_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**fields)


def test_lora_config_normalises_numpy_numbers():
    lora = LoraConfig(rank=np.int64(4), alpha=np.float32(8.0))
    assert type(lora.rank) is int and type(lora.alpha) is float and lora.scale == 2.0


@pytest.mark.parametrize("fields, message", [
    (dict(num_layers=True), "num_layers must be a positive int; got True"),
    (dict(hidden_size=0), "hidden_size must be a positive int; got 0"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be a finite number > 0; got 0.0"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number > 0; got nan"),
    (dict(rms_norm_eps=2.0), "rms_norm_eps must be < 1; got 2.0"),
    (dict(rope_theta=float("inf")), "rope_theta must be a finite number > 0; got inf"),
    (dict(tie_embeddings="yes"), "tie_embeddings must be a bool; got 'yes'"),
    (dict(eos_token_ids=(2, 500)), r"special token ids \[500\] are not ints in the vocabulary "
                                   r"0\.\.96"),
    (dict(bos_token_id=-1), r"special token ids \[-1\]"),
])
def test_model_config_refuses_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.tiny(**fields)


def test_rope_scaling_refuses_bad_fields():
    with pytest.raises(ValueError, match="rope scaling factor must be a finite number > 0; got nan"):
        RopeScaling("llama3", factor=float("nan"))
    with pytest.raises(ValueError, match="original_max_position_embeddings must be an int >= 1"):
        RopeScaling("linear", 2.0, original_max_position_embeddings=0)


def _hf(**extra):
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 97,
            "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, **extra}


@pytest.mark.parametrize("extra, message", [
    (dict(hidden_act="gelu"), r"hidden_act='gelu' \(allowed: silu, swish\)"),
    (dict(sliding_window=16, max_position_embeddings=4096),
     "sliding_window=16 .sliding-window attention is not implemented"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(model_type="gemma"), "unknown architecture: model_type='gemma'"),
])
def test_hf_config_features_that_would_be_ignored_are_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict(_hf(**extra))


def test_hf_config_features_that_change_nothing_are_accepted():
    # Qwen2 configs name a window but switch it off; a window as long as the context is none.
    ModelConfig.from_hf_dict(_hf(model_type="qwen2", sliding_window=32768,
                                 use_sliding_window=False))
    ModelConfig.from_hf_dict(_hf(sliding_window=4096, max_position_embeddings=4096,
                                 hidden_act="silu", mlp_bias=False, partial_rotary_factor=1.0))
    ModelConfig.from_hf_dict(_hf(sliding_window=None))


def test_tiny_byte_is_the_eval_tiny_model():
    from eval import cli as eval_cli
    from lragent_jax.tokenizer import ByteTokenizer

    config = ModelConfig.tiny_byte()
    assert config.vocab_size == ByteTokenizer.vocab_size
    assert config.eos_token_ids == ByteTokenizer.eos_token_ids
    if hasattr(eval_cli, "tiny_config"):  # until eval uses ModelConfig.tiny_byte itself
        assert eval_cli.tiny_config() == config
