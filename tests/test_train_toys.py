"""Small models and data shared by the training tests (no tests here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lragent_jax.config import ModelConfig
from tests.conftest import CharTokenizer

ROLES = ("plan", "action", "reflect")


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig.tiny(vocab_size=CharTokenizer.vocab_size, **overrides)


def numpy_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random weights drawn with numpy (no per-shape jit compiles), float32."""
    from lragent_jax.model import param_shapes

    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if "norm" in name:
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if "embed" in name:
            return rng.standard_normal(shape).astype(np.float32)
        return (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype(np.float32)

    import jax

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config),
                                            is_leaf=lambda s: isinstance(s, tuple))


def tiny_base(**overrides):
    from train.loop import BaseModel

    config = tiny_config(**overrides)
    return BaseModel(config, numpy_params(config), CharTokenizer(), "tiny")


def toy_samples(count: int, offset: int = 0, roles=ROLES, segments: bool = True) -> dict:
    """Short arithmetic 'trajectories': each role answers in its own format."""
    out = {role: [] for role in roles}
    for i in range(count):
        a, b = (i + offset) % 7, (i + offset) % 5
        pieces = [f"Q{i + offset}: {a}+{b}?\n", "### Response:\n"]
        for role in roles:
            sample = {"input": "".join(pieces), "output": f"{role[0]}={a + b}"}
            if segments:  # the prompt is env text: it says so, as the role-sample format asks
                sample["segments"] = list(pieces)
                sample["writers"] = ["env"] * len(pieces)
            out[role].append(sample)
    return out


def write_role_dir(directory: Path, samples: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for role, items in samples.items():
        (directory / f"{role}.json").write_text(json.dumps(items), encoding="utf-8")
    return directory
