"""Role adapters on disk, in a layout close to Hugging Face PEFT.

    folder/
      lragent_adapters.json                 manifest: agents in order, shared_a, rank, alpha,
                                            targets, the base model's name and config fingerprint
      <agent>/adapter_config.json           PEFT LoRA config (r, lora_alpha, target_modules, ...)
      <agent>/adapter_model.safetensors     base_model.model.model.layers.{i}.self_attn.v_proj
                                            .lora_A.weight [r, in], .lora_B.weight [out, r]

Each agent's folder is a standalone PEFT adapter (with shared A every folder carries the same A).
On disk B is UNSCALED, as PEFT stores it; in memory B holds the scale alpha / r folded in (see
``lora.py``). Scaling by a power of two (the default alpha / r = 2) is exact, so an export / import
round trip returns the same bits; other scales can differ by one unit in the last place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lragent_jax.config import ADAPTER_TARGETS, LoraConfig, ModelConfig
from lragent_jax.lora import validate_adapters

MANIFEST = "lragent_adapters.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "lragent-adapters"
FORMAT_VERSION = 1

# our target name -> the HF module path inside a decoder layer
HF_MODULES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_FROM_HF = {path.rsplit(".", 1)[1]: module for module, path in HF_MODULES.items()}
_STORAGE_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


class AdapterFileError(ValueError):
    """An adapter folder is missing, corrupt, or made for another base model or config."""


def config_fingerprint(config: ModelConfig) -> str:
    """A short hash of the architecture (every field of the HF config, not the display name)."""
    text = json.dumps(config.to_hf_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_model(config: ModelConfig) -> str:
    return (f"{config.name!r} (fingerprint {config_fingerprint(config)}: {config.num_layers} layers,"
            f" width {config.hidden_size}, mlp {config.intermediate_size}, {config.num_heads}/"
            f"{config.num_kv_heads} heads of {config.head_dim}, vocab {config.vocab_size})")


def tensor_key(layer: int, module: str, leaf: str) -> str:
    """PEFT key of one layer's adapter matrix; ``leaf`` is "A" or "B"."""
    return f"base_model.model.model.layers.{layer}.{HF_MODULES[module]}.lora_{leaf}.weight"


def _agent_dir_name(agent: str) -> str:
    if not agent or agent in (".", "..") or any(c in agent for c in "/\\\0"):
        raise ValueError(f"agent name {agent!r} cannot name a folder")
    return agent


def save_adapters(folder: str | os.PathLike, adapters: dict, lora: LoraConfig,
                  config: ModelConfig, *, metadata: dict | None = None,
                  dtype: str = "float32") -> Path:
    """Write ``adapters`` (the in-memory pytree, scale folded into B) to ``folder``.

    The folder is written beside its destination and renamed into place, so a reader never sees
    a half-written export. ``dtype``: storage dtype ("float32", "bfloat16" or "float16").
    ``metadata``: JSON-serialisable facts to keep in the manifest (training command, metrics).
    """
    from safetensors.numpy import save_file

    validate_adapters(adapters, config, lora)
    if dtype not in _STORAGE_DTYPES:
        raise ValueError(f"storage dtype {dtype!r} is not supported; allowed: "
                         f"{sorted(_STORAGE_DTYPES)}")
    storage = _STORAGE_DTYPES[dtype]
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        host = {m: {leaf: np.asarray(x, np.float64) for leaf, x in leaves.items()}
                for m, leaves in adapters.items()}
        for agent_index, agent in enumerate(lora.agents):
            tensors = {}
            for module in lora.targets:
                a = host[module]["a"] if lora.shared_a else host[module]["a"][:, agent_index]
                b = host[module]["b"][:, agent_index] / lora.scale  # [L, R, Dout], unscaled
                for layer in range(config.num_layers):
                    tensors[tensor_key(layer, module, "A")] = np.ascontiguousarray(
                        a[layer].T.astype(storage))
                    tensors[tensor_key(layer, module, "B")] = np.ascontiguousarray(
                        b[layer].T.astype(storage))
            agent_dir = staging / _agent_dir_name(agent)
            agent_dir.mkdir()
            save_file(tensors, agent_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
            (agent_dir / ADAPTER_CONFIG).write_text(json.dumps(
                _peft_config(lora, config), indent=2) + "\n", encoding="utf-8")
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "agents": list(lora.agents), "shared_a": lora.shared_a, "rank": lora.rank,
            "alpha": lora.alpha, "targets": list(lora.targets), "dtype": dtype,
            "base_model": {"name": config.name, "fingerprint": config_fingerprint(config),
                           "config": config.to_hf_dict()},
            "metadata": metadata or {},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n",
                                        encoding="utf-8")
        _replace_dir(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _peft_config(lora: LoraConfig, config: ModelConfig) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "init_lora_weights": True,
        "target_modules": [HF_MODULES[m].rsplit(".", 1)[1] for m in lora.targets],
        "base_model_name_or_path": config.name,
    }


def _replace_dir(staging: Path, folder: Path) -> None:
    """Move ``staging`` to ``folder``, replacing an existing export (never a foreign folder)."""
    if folder.exists():
        if not (folder / MANIFEST).is_file():
            raise AdapterFileError(f"{folder} exists and is not an adapter export (no {MANIFEST});"
                                   " refusing to overwrite it")
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, folder)


def read_manifest(folder: str | os.PathLike) -> dict:
    """The validated manifest of an adapter folder."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise AdapterFileError(f"adapter folder not found: {folder}")
    if not path.is_file():
        raise AdapterFileError(f"{folder} is not an lragent adapter export: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path}: malformed JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: not an lragent adapter manifest (format "
                               f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise AdapterFileError(f"{path}: format version {manifest.get('version')!r} is not "
                               f"supported (this library reads version {FORMAT_VERSION})")
    for key, kind in (("agents", list), ("shared_a", bool), ("rank", int), ("alpha", (int, float)),
                      ("targets", list), ("base_model", dict)):
        if not isinstance(manifest.get(key), kind):
            raise AdapterFileError(f"{path}: field {key!r} is missing or of the wrong type")
    return manifest


def lora_from_manifest(manifest: dict, path: Path | str = MANIFEST) -> LoraConfig:
    try:
        return LoraConfig(rank=manifest["rank"], alpha=float(manifest["alpha"]),
                          targets=tuple(manifest["targets"]), agents=tuple(manifest["agents"]),
                          shared_a=manifest["shared_a"])
    except ValueError as err:
        raise AdapterFileError(f"{path}: invalid LoRA settings: {err}") from None


def check_base_model(manifest: dict, config: ModelConfig, folder: str | os.PathLike) -> None:
    """Refuse adapters made for another base model, naming both."""
    base = manifest["base_model"]
    if base.get("fingerprint") == config_fingerprint(config):
        return
    saved = base.get("config")
    try:
        saved_desc = describe_model(ModelConfig.from_hf_dict(saved, name=base.get("name", "?")))
    except Exception:  # an unreadable saved config still gets a useful message
        saved_desc = f"{base.get('name')!r} (fingerprint {base.get('fingerprint')})"
    raise AdapterFileError(f"the adapters in {folder} were trained for base model {saved_desc}, "
                           f"but the loaded base model is {describe_model(config)}; load them with "
                           "the base model they were made for")


def load_adapters(folder: str | os.PathLike, *, config: ModelConfig,
                  dtype=jnp.float32) -> tuple[dict, LoraConfig]:
    """Read an export written by ``save_adapters``: ``(adapters, lora)`` with the scale folded into
    B. Refuses adapters made for another base model; with shared A, checks that every agent's file
    holds the same A. Every problem in the tensor files is collected and reported at once."""
    from safetensors import safe_open

    folder = Path(folder)
    manifest = read_manifest(folder)
    lora = lora_from_manifest(manifest, folder / MANIFEST)
    check_base_model(manifest, config, folder)

    problems: list[str] = []
    per_agent: list[dict[str, dict[str, np.ndarray]]] = []
    for agent in lora.agents:
        agent_dir = folder / _agent_dir_name(agent)
        problems.extend(_check_peft_config(agent_dir / ADAPTER_CONFIG, lora))
        weights = agent_dir / ADAPTER_WEIGHTS
        if not weights.is_file():
            problems.append(f"{weights}: missing")
            per_agent.append({})
            continue
        tensors: dict[str, dict[str, np.ndarray]] = {}
        try:
            with safe_open(str(weights), framework="numpy") as f:
                keys = set(f.keys())
                expected = set()
                for module in lora.targets:
                    d_in, d_out = config.module_dims(module)
                    a = np.zeros((config.num_layers, d_in, lora.rank), np.float32)
                    b = np.zeros((config.num_layers, lora.rank, d_out), np.float32)
                    for layer in range(config.num_layers):
                        for leaf, out, shape in (("A", a, (lora.rank, d_in)),
                                                 ("B", b, (d_out, lora.rank))):
                            key = tensor_key(layer, module, leaf)
                            expected.add(key)
                            if key not in keys:
                                problems.append(f"{weights}: missing tensor {key}")
                                continue
                            x = f.get_tensor(key)
                            if x.shape != shape:
                                problems.append(f"{weights}: {key} has shape {list(x.shape)}, "
                                                f"expected {list(shape)}")
                                continue
                            out[layer] = x.astype(np.float32).T
                    tensors[module] = {"a": a, "b": b}
                extra = sorted(keys - expected)
                if extra:
                    problems.append(f"{weights}: {len(extra)} unexpected tensor(s), e.g. {extra[0]}"
                                    " (a target module or layer this config does not have)")
        except Exception as err:  # safetensors raises its own error type for corrupt files
            problems.append(f"{weights}: unreadable ({type(err).__name__}: {err})")
        per_agent.append(tensors)
    if problems:
        raise AdapterFileError(f"cannot load adapters from {folder}:\n  " + "\n  ".join(problems))

    if lora.shared_a:
        for module in lora.targets:
            first = per_agent[0][module]["a"]
            for agent, tensors in zip(lora.agents[1:], per_agent[1:]):
                differ = np.flatnonzero(np.any(tensors[module]["a"] != first, axis=(1, 2)))
                if differ.size:
                    raise AdapterFileError(
                        f"{folder}: the manifest says shared_a, but agent {agent!r} has a different"
                        f" A than {lora.agents[0]!r} for module {module!r} in layers "
                        f"{differ.tolist()[:8]}")

    adapters = {}
    for module in lora.targets:
        b = np.stack([t[module]["b"] for t in per_agent], axis=1) * np.float32(lora.scale)
        if lora.shared_a:
            a = per_agent[0][module]["a"]
        else:
            a = np.stack([t[module]["a"] for t in per_agent], axis=1)
        adapters[module] = {"a": jnp.asarray(a, dtype), "b": jnp.asarray(b, dtype)}
    validate_adapters(adapters, config, lora)
    return adapters, lora


def _check_peft_config(path: Path, lora: LoraConfig) -> list[str]:
    if not path.is_file():
        return [f"{path}: missing"]
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [f"{path}: malformed JSON: {err}"]
    if not isinstance(cfg, dict):
        return [f"{path}: expected a JSON object"]
    problems = []
    if cfg.get("r") != lora.rank:
        problems.append(f"{path}: r={cfg.get('r')!r} but the manifest says rank {lora.rank}")
    if cfg.get("lora_alpha") is None or float(cfg["lora_alpha"]) != lora.alpha:
        problems.append(f"{path}: lora_alpha={cfg.get('lora_alpha')!r} but the manifest says "
                        f"{lora.alpha}")
    modules = cfg.get("target_modules")
    if not isinstance(modules, list) or any(m not in _FROM_HF for m in modules):
        problems.append(f"{path}: target_modules={modules!r}; allowed: {sorted(_FROM_HF)}")
    elif tuple(t for t in ADAPTER_TARGETS if t in {_FROM_HF[m] for m in modules}) != lora.targets:
        problems.append(f"{path}: target_modules={modules} differ from the manifest's "
                        f"{list(lora.targets)}")
    return problems


def adapter_files_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest's free-form ``metadata`` (training command, metrics) of an export."""
    return read_manifest(folder).get("metadata", {})
