"""Frozen configuration dataclasses: the model family, LoRA adapters, named presets.

Dimension alphabet used across the package (shape annotations and einsums):
  B batch, T new tokens, S cache positions, D model width, N query heads, K kv heads, G = N/K,
  H head dim, R rank, A agents, L layers, V vocab, F mlp width.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import ml_dtypes
import numpy as np

# The floating-point dtypes of weights, adapters and exports, by name: the one table that CLI
# choices, loaders, savers and the training compute dtype read (``to_dtype`` resolves a value).
DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32),
                               "bfloat16": np.dtype(ml_dtypes.bfloat16),
                               "float16": np.dtype(np.float16)}
DTYPE_NAMES = tuple(DTYPES)

ADAPTER_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# HF ``hidden_act`` names of the MLP activation this model implements (SiLU-gated MLP).
SUPPORTED_ACTIVATIONS = ("silu", "swish")


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def to_dtype(value: Any, what: str = "dtype") -> np.dtype:
    """The ``DTYPES`` entry of a name ("bfloat16"), a numpy or jnp type, or a dtype; raises naming
    ``value`` and the allowed names otherwise."""
    try:
        resolved = np.dtype(DTYPES.get(value, value) if isinstance(value, str) else value)
    except TypeError:
        resolved = None
    if resolved not in DTYPES.values():
        raise ValueError(f"unsupported {what} {value!r}; allowed: {', '.join(DTYPE_NAMES)}")
    return resolved


def check_positive_number(name: str, value: Any) -> None:
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``kind``: "llama3" (Llama 3.1/3.2) or "linear"."""

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ("llama3", "linear"):
            raise ValueError(f"rope scaling kind {self.kind!r} is not supported; allowed: 'llama3', "
                             "'linear'")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            check_positive_number(f"rope scaling {name}", getattr(self, name))
        if not is_int(self.original_max_position_embeddings) or \
                self.original_max_position_embeddings < 1:
            raise ValueError("rope scaling original_max_position_embeddings must be an int >= 1; "
                             f"got {self.original_max_position_embeddings!r}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor; got "
                             f"{self.high_freq_factor} <= {self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2, SmolLM2)."""

    name: str
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, field)
            if not is_int(value) or value < 1:
                raise ValueError(f"ModelConfig.{field} must be a positive int; got {value!r}")
            object.__setattr__(self, field, int(value))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE; got {self.head_dim}")
        check_positive_number("ModelConfig.rope_theta", self.rope_theta)
        check_positive_number("ModelConfig.rms_norm_eps", self.rms_norm_eps)
        if self.rms_norm_eps >= 1:
            raise ValueError(f"ModelConfig.rms_norm_eps must be < 1; got {self.rms_norm_eps!r}")
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        object.__setattr__(self, "rms_norm_eps", float(self.rms_norm_eps))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"ModelConfig.rope_scaling must be a RopeScaling or None; got "
                             f"{self.rope_scaling!r}")
        for field in ("tie_embeddings", "qkv_bias"):
            value = getattr(self, field)
            if not (isinstance(value, bool) or (is_int(value) and value in (0, 1))):
                raise ValueError(f"ModelConfig.{field} must be a bool; got {value!r}")
            object.__setattr__(self, field, bool(value))
        ids = tuple(self.eos_token_ids)
        bad = [t for t in ids if not is_int(t) or not 0 <= t < self.vocab_size]
        if self.bos_token_id is not None and (not is_int(self.bos_token_id)
                                              or not 0 <= self.bos_token_id < self.vocab_size):
            bad.append(self.bos_token_id)
        if bad:
            raise ValueError(f"ModelConfig: special token ids {bad} are not ints in the "
                             f"vocabulary 0..{self.vocab_size - 1}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in ids))
        if self.bos_token_id is not None:
            object.__setattr__(self, "bos_token_id", int(self.bos_token_id))

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_dims(self, module: str) -> tuple[int, int]:
        """(input width, output width) of an adapter target's projection."""
        dims = {
            "q": (self.hidden_size, self.q_dim),
            "k": (self.hidden_size, self.kv_dim),
            "v": (self.hidden_size, self.kv_dim),
            "o": (self.q_dim, self.hidden_size),
            "gate": (self.hidden_size, self.intermediate_size),
            "up": (self.hidden_size, self.intermediate_size),
            "down": (self.intermediate_size, self.hidden_size),
        }
        if module not in dims:
            raise ValueError(f"unknown adapter target {module!r}; allowed: {ADAPTER_TARGETS}")
        return dims[module]

    def num_parameters(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = (d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d + 3 * d * f + 2 * d)
        if self.qkv_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        total = v * d + self.num_layers * per_layer + d
        if not self.tie_embeddings:
            total += v * d
        return total

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- presets (shapes of the public checkpoints) ----
    @classmethod
    def smollm2_135m(cls) -> "ModelConfig":
        return cls(name="smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                   num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                   rms_norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=8192,
                   bos_token_id=1, eos_token_ids=(2,))

    @classmethod
    def llama3_1_8b(cls) -> "ModelConfig":
        return cls(name="llama-3.1-8b", vocab_size=128256, hidden_size=4096,
                   intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                   head_dim=128, rope_theta=500000.0, rope_scaling=RopeScaling(
                       "llama3", 8.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5,
                   max_position_embeddings=131072, bos_token_id=128000,
                   eos_token_ids=(128001, 128008, 128009))

    @classmethod
    def llama3_1_70b(cls) -> "ModelConfig":
        return cls.llama3_1_8b().replace(name="llama-3.1-70b", hidden_size=8192,
                                         intermediate_size=28672, num_layers=80, num_heads=64)

    @classmethod
    def llama3_2_1b(cls) -> "ModelConfig":
        return cls(name="llama-3.2-1b", vocab_size=128256, hidden_size=2048,
                   intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                   head_dim=64, rope_theta=500000.0, rope_scaling=RopeScaling(
                       "llama3", 32.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5, tie_embeddings=True,
                   max_position_embeddings=131072, bos_token_id=128000,
                   eos_token_ids=(128001, 128008, 128009))

    @classmethod
    def llama2_7b(cls) -> "ModelConfig":
        return cls(name="llama-2-7b", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                   num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                   rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
                   bos_token_id=1, eos_token_ids=(2,))

    @classmethod
    def qwen2_0_5b(cls) -> "ModelConfig":
        return cls(name="qwen2-0.5b", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                   num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                   rope_theta=1000000.0, rms_norm_eps=1e-6, tie_embeddings=True, qkv_bias=True,
                   max_position_embeddings=32768, bos_token_id=None,
                   eos_token_ids=(151643, 151645))

    @classmethod
    def mistral_7b(cls) -> "ModelConfig":
        # Mistral-7B-v0.3 (no sliding window).
        return cls(name="mistral-7b", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                   num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                   rope_theta=1000000.0, rms_norm_eps=1e-5, max_position_embeddings=32768,
                   bos_token_id=1, eos_token_ids=(2,))

    @classmethod
    def tiny(cls, *, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16,
             num_layers: int = 2, hidden_size: int = 48, intermediate_size: int = 96,
             vocab_size: int = 97, **overrides: Any) -> "ModelConfig":
        """A small random-weight config for tests."""
        fields = dict(name="tiny", vocab_size=vocab_size, hidden_size=hidden_size,
                      intermediate_size=intermediate_size, num_layers=num_layers,
                      num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,))
        return cls(**{**fields, **overrides})

    @classmethod
    def tiny_byte(cls) -> "ModelConfig":
        """The random-weight model of ``python -m train --model tiny`` and ``python -m eval
        --model tiny`` (one definition, so adapters trained by one load in the other): byte
        tokens (``tokenizer.ByteTokenizer``), 2 layers of width 64. Its weights are
        ``model.init_params(jax.random.key(0), config)``."""
        from lragent_jax.tokenizer import ByteTokenizer

        return cls.tiny(vocab_size=ByteTokenizer.vocab_size,
                        eos_token_ids=ByteTokenizer.eos_token_ids,
                        bos_token_id=ByteTokenizer.bos_token_id, num_heads=4, num_kv_heads=2,
                        head_dim=16, hidden_size=64, intermediate_size=128, num_layers=2)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        key = name.replace("-", "_").replace(".", "_").lower()
        if key not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
        return PRESETS[key]()

    # ---- HF config.json ----
    @classmethod
    def from_hf_dict(cls, cfg: dict, name: str = "hf") -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict (Llama, Mistral, Qwen2 architectures)."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        known_types = ("llama", "mistral", "qwen2")
        known_archs = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
        # model_type decides when present: a Llama class name in ``architectures`` does not make
        # another model type's config (its extra fields would be ignored) a Llama.
        if (model_type not in known_types if model_type is not None
                else not any(a in known_archs for a in archs)):
            raise ValueError(f"unknown architecture: model_type={model_type!r}, architectures="
                             f"{archs}; supported model types: {known_types}")
        unsupported = _unsupported_hf_features(cfg)
        if unsupported:
            raise ValueError("config.json asks for features this model does not implement: "
                             + "; ".join(unsupported))
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks required keys {missing}")
        num_heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        scaling = None
        rs = cfg.get("rope_scaling") or None
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type"))
            if kind in ("llama3", "linear"):
                scaling = RopeScaling(kind=kind, factor=float(rs.get("factor", 1.0)),
                                      low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                                      high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                                      original_max_position_embeddings=int(
                                          rs.get("original_max_position_embeddings", 8192)))
            elif kind not in (None, "default"):
                raise ValueError(f"rope scaling type {kind!r} is not supported; allowed: llama3, "
                                 "linear")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        qkv_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
        return cls(
            name=name,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf_dict(self) -> dict:
        """The inverse of ``from_hf_dict`` (a Llama/Qwen2 ``config.json``)."""
        cfg = {
            "architectures": ["Qwen2ForCausalLM" if self.qkv_bias else "LlamaForCausalLM"],
            "model_type": "qwen2" if self.qkv_bias else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.qkv_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
        }
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            cfg["rope_scaling"] = {"rope_type": rs.kind, "factor": rs.factor,
                                   "low_freq_factor": rs.low_freq_factor,
                                   "high_freq_factor": rs.high_freq_factor,
                                   "original_max_position_embeddings":
                                       rs.original_max_position_embeddings}
        return cfg


def _unsupported_hf_features(cfg: dict) -> list[str]:
    """Fields of an HF config that would change the model's output if honoured: refused rather
    than ignored."""
    problems = []
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act not in SUPPORTED_ACTIVATIONS:
        problems.append(f"hidden_act={act!r} (allowed: {', '.join(SUPPORTED_ACTIVATIONS)})")
    window = cfg.get("sliding_window")
    positions = cfg.get("max_position_embeddings", 8192)
    if (window is not None and cfg.get("use_sliding_window", True) is not False
            and not (is_int(window) and is_int(positions) and window >= positions)):
        problems.append(f"sliding_window={window!r} (sliding-window attention is not implemented;"
                        " allowed: null, or use_sliding_window=false)")
    if cfg.get("mlp_bias"):
        problems.append(f"mlp_bias={cfg['mlp_bias']!r} (MLP biases are not implemented; allowed:"
                        " false)")
    factor = cfg.get("partial_rotary_factor", 1.0)
    if factor not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor={factor!r} (partial RoPE is not implemented; "
                        "allowed: 1.0)")
    for key in ("num_local_experts", "num_experts"):
        if cfg.get(key):
            problems.append(f"{key}={cfg[key]!r} (mixture-of-experts layers are not implemented)")
    return problems


PRESETS = {
    "smollm2_135m": ModelConfig.smollm2_135m,
    "llama3_1_8b": ModelConfig.llama3_1_8b,
    "llama3_1_70b": ModelConfig.llama3_1_70b,
    "llama3_2_1b": ModelConfig.llama3_2_1b,
    "llama2_7b": ModelConfig.llama2_7b,
    "qwen2_0_5b": ModelConfig.qwen2_0_5b,
    "mistral_7b": ModelConfig.mistral_7b,
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Multi-agent LoRA adapters.

    ``shared_a``: one A per (layer, module) shared by all agents (needed by base+low-rank cache
    sharing); otherwise one A per agent. B is always per (layer, module, agent) and holds the
    scale alpha / rank folded in.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")
    agents: tuple[str, ...] = ("plan", "action", "reflect")
    shared_a: bool = True

    def __post_init__(self):
        if not is_int(self.rank) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive int; got {self.rank!r}")
        if not is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a finite number > 0; got {self.alpha!r}")
        if not isinstance(self.shared_a, bool):
            raise ValueError(f"LoRA shared_a must be a bool; got {self.shared_a!r}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        if isinstance(self.targets, str) or isinstance(self.agents, str):
            raise ValueError("LoRA targets and agents are sequences of names, not one string; got "
                             f"targets={self.targets!r}, agents={self.agents!r}")
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in ADAPTER_TARGETS]
        if unknown:
            raise ValueError(f"unknown adapter target(s) {unknown}; allowed: {ADAPTER_TARGETS}")
        if not targets:
            raise ValueError(f"LoRA targets must not be empty; allowed: {ADAPTER_TARGETS}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"LoRA targets repeat a module: {targets}")
        agents = tuple(self.agents)
        if not agents:
            raise ValueError("LoRA needs at least one agent name")
        bad = [a for a in agents if not isinstance(a, str) or not a]
        if bad:
            raise ValueError(f"agent names must be non-empty strings; got {bad} in {agents!r}")
        if len(set(agents)) != len(agents):
            raise ValueError(f"agent names must be distinct; got {agents}")
        # canonical order keeps pytrees and checkpoints independent of how targets were listed
        object.__setattr__(self, "targets", tuple(t for t in ADAPTER_TARGETS if t in targets))
        object.__setattr__(self, "agents", agents)

    @property
    def num_agents(self) -> int:
        return len(self.agents)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def agent_index(self, agent: str | int) -> int:
        """Index of an agent given by name or by index (a Python or numpy integer; not a bool).
        Negative indices are not accepted here."""
        allowed = f"allowed: 0..{self.num_agents - 1} ({', '.join(self.agents)})"
        known = f"known agents: {list(self.agents)}"
        if isinstance(agent, bool):
            raise ValueError(f"agent {agent!r} is a bool, not an agent name or index; {known}")
        if is_int(agent):
            if not 0 <= agent < self.num_agents:
                raise ValueError(f"agent index {int(agent)} out of range; {allowed}")
            return int(agent)
        if not isinstance(agent, str):
            raise ValueError(f"agent {agent!r} of type {type(agent).__name__} is not an agent "
                             f"name or index; {known} or an index {allowed[9:]}")
        if agent not in self.agents:
            raise ValueError(f"unknown agent {agent!r}; {known}")
        return self.agents.index(agent)

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)
