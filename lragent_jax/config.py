"""Frozen configuration dataclasses: the model family, LoRA adapters, named presets.

Dimension alphabet used across the package (shape annotations and einsums):
  B batch, T new tokens, S cache positions, D model width, N query heads, K kv heads, G = N/K,
  H head dim, R rank, A agents, L layers, V vocab, F mlp width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

ADAPTER_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


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
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0; got {self.factor}")
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
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{field} must be a positive int; got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE; got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0; got {self.rope_theta}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

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
        if model_type not in known_types and not any(a in known_archs for a in archs):
            raise ValueError(f"unknown architecture: model_type={model_type!r}, architectures="
                             f"{archs}; supported model types: {known_types}")
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


PRESETS = {
    "smollm2_135m": ModelConfig.smollm2_135m,
    "llama3_1_8b": ModelConfig.llama3_1_8b,
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
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive int; got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number; got {self.alpha!r}")
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
        """Index of an agent given by name or index; -1 / None-like names are not accepted here."""
        if isinstance(agent, int):
            if not 0 <= agent < self.num_agents:
                raise ValueError(f"agent index {agent} out of range; allowed: 0..{self.num_agents - 1}"
                                 f" ({', '.join(self.agents)})")
            return agent
        if agent not in self.agents:
            raise ValueError(f"unknown agent {agent!r}; known agents: {list(self.agents)}")
        return self.agents.index(agent)

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)
