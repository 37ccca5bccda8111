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

Integrity: an export is built in a staging folder and switched in with one atomic rename; the
manifest records the sha256 of every file and a fingerprint of the base model's weights (a hash of
a fixed sample of each weight tensor), so that loading refuses changed files and adapters trained
on other weights of the same shape (a base vs an instruct checkpoint). Non-finite adapters are
never written, and refused at load with the tensor named.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lragent_jax.config import ADAPTER_TARGETS, DTYPES, LoraConfig, ModelConfig
from lragent_jax.loading.integrity import (atomic_write_text, count_nonfinite, failpoint,
                                           is_float_dtype, sha256_file, staging_dir,
                                           swap_into_place)
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


class AdapterFileError(ValueError):
    """An adapter folder is missing, corrupt, or made for another base model or config."""


class OtherWeightsError(AdapterFileError):
    """Adapters were trained on other weights of the same architecture (fingerprints differ)."""


FINGERPRINT_METHOD = "bf16-sample-64"
_FINGERPRINT_SAMPLES = 64
_FLUSH_BELOW = 2.0 ** -14  # float16's smallest normal: values below it are compared as zero


def _stacked_leaves(params: Mapping[str, Any], config: ModelConfig | None = None
                    ) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Logical weight tensors by name ("embed", "layers/q", ...): (shape, take) where
    ``take(index)`` gathers the values at an index tuple of the stacked [L, ...] tensor. Works on
    per-layer leaves stacked on a leading axis, on a list of per-layer dicts of the same leaves,
    and (with ``config``) on the fused inference layout (``lragent_jax.inference``)."""
    from lragent_jax.inference import is_inference_layout, training_layout_views

    if is_inference_layout(params) and "qkv" in params["layers"][0]:
        if config is None:
            raise ValueError("the fingerprint of inference-layout params needs their ModelConfig")
        return training_layout_views(dict(params), config)
    out = {}
    for name, value in params.items():
        if name != "layers":
            out[name] = (tuple(value.shape), lambda index, x=value: _gather(x, index))
    layers = params.get("layers", {})
    if isinstance(layers, Mapping):
        for name, value in layers.items():
            out[f"layers/{name}"] = (tuple(value.shape),
                                     lambda index, x=value: _gather(x, index))
    else:  # one dict per layer
        for name in layers[0]:
            per_layer = [layer[name] for layer in layers]
            shape = (len(per_layer), *per_layer[0].shape)

            def take(index, per_layer=per_layer):
                values = np.empty(len(index[0]), np.float32)
                for layer in np.unique(index[0]):
                    rows = np.flatnonzero(index[0] == layer)
                    values[rows] = _gather(per_layer[layer], tuple(i[rows] for i in index[1:]))
                return values

            out[f"layers/{name}"] = (shape, take)
    return out


def _gather(x, index) -> np.ndarray:
    if isinstance(x, jax.Array) and not all(d.platform == "cpu" for d in x.devices()):
        return np.asarray(jax.device_get(x[index]), np.float32)  # a small gather on the device
    return np.asarray(np.asarray(x)[index], np.float32)


def weights_fingerprint(params: Mapping[str, Any], config: ModelConfig | None = None
                        ) -> dict[str, Any]:
    """64 values at fixed positions of every weight tensor, rounded to bfloat16 (hex): cheap for
    any model size, independent of the parameter layout, equal for float32 and bfloat16 loads of
    one checkpoint and different for another checkpoint of the same shape."""
    tensors = {}
    dtypes = set()
    for name, (shape, take) in sorted(_stacked_leaves(params, config).items()):
        size = int(np.prod(shape))
        flat = np.unique(np.linspace(0, size - 1, _FINGERPRINT_SAMPLES).astype(np.int64))
        values = take(np.unravel_index(flat, shape))
        values = np.where(np.abs(values) < _FLUSH_BELOW, 0.0, values).astype(ml_dtypes.bfloat16)
        tensors[name] = values.view(np.uint16).astype(">u2").tobytes().hex()
    for leaf in jax.tree.leaves(params):
        dtypes.add(str(np.dtype(leaf.dtype)))
    return {"method": FINGERPRINT_METHOD, "dtype": ",".join(sorted(dtypes)), "tensors": tensors}


def _decode(text: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(text), ">u2").astype(np.uint16).view(
        ml_dtypes.bfloat16).astype(np.float32)


def _differing_tensors(saved: dict, now: dict) -> list[str]:
    """Tensors whose samples differ: bit for bit, or by more than one bfloat16 step where either
    side was loaded in float16 (float16 rounds some values of a float32 file differently)."""
    lenient = "float16" in saved.get("dtype", "").split(",") + now["dtype"].split(",")
    differ = []
    for name in sorted(set(saved["tensors"]) | set(now["tensors"])):
        a, b = saved["tensors"].get(name), now["tensors"].get(name)
        if a == b:
            continue
        try:
            x, y = _decode(a), _decode(b)
        except (TypeError, ValueError):
            differ.append(name)
            continue
        if not lenient or x.shape != y.shape or np.any(
                np.abs(x - y) > 2.0 ** -7 * np.maximum(np.abs(x), np.abs(y)) + 2 * _FLUSH_BELOW):
            differ.append(name)
    return differ


def check_base_weights(manifest: dict, params: Mapping[str, Any], folder: str | os.PathLike,
                       *, allow_other_weights: bool = False,
                       config: ModelConfig | None = None) -> None:
    """Refuse adapters whose manifest fingerprints other base weights than ``params``; warn when
    an older manifest carries no fingerprint."""
    saved = manifest["base_model"].get("weights")
    if not isinstance(saved, dict) or saved.get("method") != FINGERPRINT_METHOD or \
            not isinstance(saved.get("tensors"), dict):
        warnings.warn(f"{folder}: the manifest records no fingerprint of the base weights (an "
                      "older export), so it cannot be checked that these adapters were trained "
                      "on the loaded weights", stacklevel=3)
        return
    now = weights_fingerprint(params, config)
    differ = _differing_tensors(saved, now)
    if not differ:
        return
    message = (f"the adapters in {folder} were trained on other weights than the loaded base "
               f"model {manifest['base_model'].get('name')!r} (same architecture, but "
               f"{len(differ)} of {len(now['tensors'])} weight tensors differ, e.g. "
               f"{', '.join(differ[:3])}): e.g. a base vs an instruct checkpoint, or another "
               "quantisation. Load them with the weights they were trained on, or pass "
               "allow_other_weights=True (--allow-other-weights) to use them anyway")
    if allow_other_weights:
        warnings.warn(message.split(": e.g.")[0] + "; used anyway (allow_other_weights)",
                      stacklevel=3)
        return
    raise OtherWeightsError(message)


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
                  dtype: str = "float32", base_params: Mapping[str, Any] | None = None) -> Path:
    """Write ``adapters`` (the in-memory pytree, scale folded into B) to ``folder``.

    The folder is written beside its destination and switched into place in one atomic step, so
    a reader never sees a half-written export. ``dtype``: storage dtype ("float32", "bfloat16" or
    "float16"). ``metadata``: JSON-serialisable facts to keep in the manifest (training command,
    metrics). ``base_params``: the base weights the adapters were trained on; their fingerprint
    goes into the manifest so that ``load_adapters`` can refuse other weights of the same shape.
    Non-finite adapters are refused.
    """
    from safetensors.numpy import save_file

    validate_adapters(adapters, config, lora)
    if dtype not in DTYPES:
        raise ValueError(f"storage dtype {dtype!r} is not supported; allowed: {sorted(DTYPES)}")
    storage = DTYPES[dtype]
    host = {m: {leaf: np.asarray(x, np.float64) for leaf, x in leaves.items()}
            for m, leaves in adapters.items()}
    bad = [f"{m}/{leaf}: {count_nonfinite(x)} of {x.size}" for m, leaves in host.items()
           for leaf, x in leaves.items() if count_nonfinite(x)]
    if bad:
        raise ValueError("refusing to export non-finite adapters (NaN or Inf values in "
                         + "; ".join(bad) + ")")
    folder = Path(folder)
    if folder.exists() and not (folder / MANIFEST).is_file():
        raise AdapterFileError(f"{folder} exists and is not an adapter export (no {MANIFEST});"
                               " refusing to overwrite it")
    fingerprint = weights_fingerprint(base_params) if base_params is not None else None
    staging = staging_dir(folder)
    try:
        files = {}
        for agent_index, agent in enumerate(lora.agents):
            tensors = {}
            for module in lora.targets:  # (an overflowing cast is caught just below)
                a = host[module]["a"] if lora.shared_a else host[module]["a"][:, agent_index]
                b = host[module]["b"][:, agent_index] / lora.scale  # [L, R, Dout], unscaled
                for layer in range(config.num_layers):
                    with np.errstate(over="ignore"):
                        tensors[tensor_key(layer, module, "A")] = np.ascontiguousarray(
                            a[layer].T.astype(storage))
                        tensors[tensor_key(layer, module, "B")] = np.ascontiguousarray(
                            b[layer].T.astype(storage))
            stored = [k for k, x in tensors.items() if count_nonfinite(x)]
            if stored:
                raise ValueError(f"refusing to export adapters that overflow {dtype}: "
                                 f"{stored[:3]}; export in float32")
            agent_dir = staging / _agent_dir_name(agent)
            agent_dir.mkdir()
            save_file(tensors, agent_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
            (agent_dir / ADAPTER_CONFIG).write_text(json.dumps(
                _peft_config(lora, config), indent=2) + "\n", encoding="utf-8")
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                files[f"{agent}/{name}"] = sha256_file(agent_dir / name)
            failpoint("export.agent")
        base_model = {"name": config.name, "fingerprint": config_fingerprint(config),
                      "config": config.to_hf_dict()}
        if fingerprint is not None:
            base_model["weights"] = fingerprint
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "agents": list(lora.agents), "shared_a": lora.shared_a, "rank": lora.rank,
            "alpha": lora.alpha, "targets": list(lora.targets), "dtype": dtype,
            "base_model": base_model, "files": files,
            "metadata": metadata or {},
        }
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
        failpoint("export.swap")
        swap_into_place(staging, folder)
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
        if not isinstance(manifest.get(key), kind) or (kind is int and isinstance(
                manifest.get(key), bool)):
            raise AdapterFileError(f"{path}: field {key!r} is missing or of the wrong type")
    if "files" in manifest and not (isinstance(manifest["files"], dict) and all(
            isinstance(v, str) for v in manifest["files"].values())):
        raise AdapterFileError(f"{path}: field 'files' must map file names to sha256 strings")
    return manifest


def verify_files(manifest: dict, folder: Path) -> list[str]:
    """Problems with the files of an export against the sha256 its manifest records."""
    problems = []
    for name, expected in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            continue  # reported as missing by the reader
        if sha256_file(path) != expected:
            problems.append(f"{path}: its sha256 differs from the one recorded at export (the "
                            "file changed or is corrupt)")
    return problems


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


def load_adapters(folder: str | os.PathLike, *, config: ModelConfig, dtype=jnp.float32,
                  params: Mapping[str, Any] | None = None,
                  allow_other_weights: bool = False) -> tuple[dict, LoraConfig]:
    """Read an export written by ``save_adapters``: ``(adapters, lora)`` with the scale folded into
    B. Refuses adapters made for another base model (its config, and with ``params`` given, its
    weights: ``allow_other_weights=True`` overrides that); with shared A, checks that every agent's
    file holds the same A. Files are checked against the manifest's sha256; every tensor must be
    floating point and finite. Every problem is collected and reported at once."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    lora = lora_from_manifest(manifest, folder / MANIFEST)
    check_base_model(manifest, config, folder)
    if params is not None:
        check_base_weights(manifest, params, folder, allow_other_weights=allow_other_weights,
                           config=config)
    if "files" not in manifest:
        warnings.warn(f"{folder}: the manifest records no file checksums (an older export); the "
                      "files are loaded unverified", stacklevel=2)

    problems: list[str] = verify_files(manifest, folder)
    per_agent: list[dict[str, dict[str, np.ndarray]]] = []
    for agent in lora.agents:
        agent_dir = folder / _agent_dir_name(agent)
        problems.extend(_check_peft_config(agent_dir / ADAPTER_CONFIG, lora))
        per_agent.append(_read_agent(agent_dir / ADAPTER_WEIGHTS, config, lora, problems))
    if problems:
        raise AdapterFileError(f"cannot load adapters from {folder}:\n  " + "\n  ".join(problems))
    if lora.shared_a:
        _check_shared_a(per_agent, lora, folder)

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


def _read_agent(weights: Path, config: ModelConfig, lora: LoraConfig,
                problems: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """One agent's ``{module: {"a": [L, in, R], "b": [L, R, out]}}`` (float32, unscaled) from its
    safetensors file; each problem found is added to ``problems`` (its tensor then stays zero)."""
    from safetensors import safe_open

    if not weights.is_file():
        problems.append(f"{weights}: missing")
        return {}
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
                        problem = _tensor_problem(key, x, shape)
                        if problem is not None:
                            problems.append(f"{weights}: {problem}")
                            continue
                        out[layer] = x.astype(np.float32).T
                tensors[module] = {"a": a, "b": b}
            extra = sorted(keys - expected)
            if extra:
                problems.append(f"{weights}: {len(extra)} unexpected tensor(s), e.g. {extra[0]}"
                                " (a target module or layer this config does not have)")
    except Exception as err:  # safetensors raises its own error type for corrupt files
        problems.append(f"{weights}: unreadable ({type(err).__name__}: {err})")
    return tensors


def _tensor_problem(key: str, x: np.ndarray, shape: tuple[int, ...]) -> str | None:
    """What is wrong with a stored adapter tensor: its shape, a non-float dtype, NaN/Inf."""
    if x.shape != shape:
        return f"{key} has shape {list(x.shape)}, expected {list(shape)}"
    if not is_float_dtype(x.dtype):
        return f"{key} is stored as {x.dtype}, not floating point"
    bad = count_nonfinite(x)
    if bad:
        return f"{key} holds {bad} non-finite value(s) (NaN or Inf) of {x.size}"
    return None


def _check_shared_a(per_agent: list[dict[str, dict[str, np.ndarray]]], lora: LoraConfig,
                    folder: Path) -> None:
    """Every agent's A equals the first agent's (the manifest says shared_a)."""
    for module in lora.targets:
        first = per_agent[0][module]["a"]
        for agent, tensors in zip(lora.agents[1:], per_agent[1:]):
            differ = np.flatnonzero(np.any(tensors[module]["a"] != first, axis=(1, 2)))
            if differ.size:
                raise AdapterFileError(
                    f"{folder}: the manifest says shared_a, but agent {agent!r} has a different"
                    f" A than {lora.agents[0]!r} for module {module!r} in layers "
                    f"{differ.tolist()[:8]}")


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
