"""Hugging Face checkpoint folders: ``config.json`` + safetensors (one file, or shards + index).

The mapping from HF tensor names to our parameter pytree is data: the model's leaf table
(``lragent_jax.model.PARAM_LEAVES``) gives each leaf's HF key, its shape and whether HF stores it
transposed ([out, in]; ours are [in, out]). The GGUF loader reads the same table, so both formats
agree with the model on layout by construction.

Every tensor is checked as it is read: floating point (integer or bool tensors are refused, not
cast), finite (NaN/Inf are counted and named), and, in files this library wrote, equal to the
crc32 recorded in the file's header (with a checksum of the config the weights were saved with).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from lragent_jax.config import DTYPE_NAMES, DTYPES, ModelConfig, to_dtype
from lragent_jax.loading.integrity import (atomic_write, atomic_write_text, count_nonfinite,
                                           crc32_of, is_float_dtype, staging_dir, swap_into_place)
from lragent_jax.model import ParamLeaf, param_leaves

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors metadata key of the checksums this library writes: {"config": sha256 of the model
# config, "tensors": {stored name: crc32 of its bytes}}; verified at load when present.
CHECKSUMS_KEY = "lragent.checksums"

# Loadable parameter dtypes (the dtype table's); the checkpoint may hold any of these too.
SUPPORTED_DTYPES = tuple(DTYPES.values())


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; ``problems`` lists every defect found, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        listed = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cannot load checkpoint {source}: {len(self.problems)} problem(s):\n"
                         f"{listed}")


def _orient(array: np.ndarray, leaf: ParamLeaf) -> np.ndarray:
    """Stored (HF or GGUF, numpy order) -> ours, and back: its own inverse."""
    return array.T if leaf.hf_transposed else array


# Present in some checkpoints, carry nothing the model needs.
_HARMLESS_KEYS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def hf_plan(config: ModelConfig) -> list[tuple[str, ParamLeaf, int | None]]:
    """(HF key, leaf, layer or None) of every tensor ``config`` needs: the global leaves, then
    layer by layer, each in the table's order."""
    leaves = param_leaves(config)
    plan = [(leaf.hf_key, leaf, None) for leaf in leaves if not leaf.per_layer]
    for layer in range(config.num_layers):
        plan += [(leaf.hf_key.format(layer=layer), leaf, layer)
                 for leaf in leaves if leaf.per_layer]
    return plan


def config_checksum(config: ModelConfig) -> str:
    """sha256 of everything in a config that changes the model's output (``to_hf_dict``)."""
    text = json.dumps(config.to_hf_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def check_tensor(key: str, array: np.ndarray, where: str, stored: np.ndarray | None = None
                 ) -> str | None:
    """The problem with a weight tensor about to be used, if any: not floating point, or holding
    NaN/Inf (counted). ``stored``: the array as read, before a cast (to tell overflow apart)."""
    raw = array if stored is None else stored
    if not is_float_dtype(raw.dtype):
        return (f"{key} ({where}) is stored as {raw.dtype}, not floating point; weights must be "
                f"{', '.join(DTYPE_NAMES[:-1])} or {DTYPE_NAMES[-1]}")
    bad = count_nonfinite(array)
    if not bad:
        return None
    if stored is not None and not count_nonfinite(stored):
        return (f"{key} ({where}): {bad} of {array.size} values overflow {array.dtype} (finite "
                f"in the file as {stored.dtype}); load in a wider dtype")
    return (f"{key} ({where}) holds {bad} non-finite value(s) (NaN or Inf) of {array.size}: "
            "the file is corrupt or the weights diverged")


def _stored_shape(shape: tuple[int, ...], leaf: ParamLeaf) -> tuple[int, ...]:
    return tuple(reversed(shape)) if leaf.hf_transposed else tuple(shape)


def normalize_dtype(dtype: Any) -> np.dtype:
    """A numpy dtype among ``SUPPORTED_DTYPES`` (accepts jnp/np types and names like "bfloat16")."""
    return to_dtype(dtype, "parameter dtype")


class TensorSource(Protocol):
    """Tensors under HF key names, in stored orientation; implemented per file format."""

    def keys(self) -> Iterable[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def read(self, key: str) -> np.ndarray: ...

    def where(self, key: str) -> str: ...


def assemble_params(config: ModelConfig, source: TensorSource, dtype: Any, source_name: str,
                    problems: Iterable[str] = (),
                    reported_absent: Iterable[str] = ()) -> dict[str, Any]:
    """Check every tensor ``config`` needs against ``source``, then read them into our pytree.

    All problems (missing, unexpected, wrong shape, unreadable) are collected and raised together
    as one ``CheckpointError``. ``problems`` carries ones the caller found earlier;
    ``reported_absent`` names keys whose absence those already explain (e.g. a missing shard), so
    they are not listed once more each.
    """
    target_dtype = normalize_dtype(dtype)
    problems = list(problems)
    reported_absent = set(reported_absent)
    available = set(source.keys())
    plan = hf_plan(config)
    for key, leaf, layer in plan:
        want = _stored_shape(leaf.shape(config, stacked=False), leaf)
        if key not in available:
            if key not in reported_absent:
                problems.append(f"missing key {key} (expected shape {want})")
            continue
        found = tuple(source.shape(key))
        if found != want:
            problems.append(f"{key}: expected shape {want}, found {found} ({source.where(key)})")
    planned = {key for key, *_ in plan}
    for key in sorted(available - planned):
        if _HARMLESS_KEYS.match(key) or (key == "lm_head.weight" and config.tie_embeddings):
            continue
        problems.append(f"unexpected key {key} ({source.where(key)}); the config does not use it")
    if problems:
        raise CheckpointError(source_name, problems)

    top_level: dict[str, np.ndarray] = {}
    stacks = {leaf.name: np.empty(leaf.shape(config), target_dtype)
              for leaf in param_leaves(config) if leaf.per_layer}
    for key, leaf, layer in plan:
        try:
            stored = np.asarray(source.read(key))
        except Exception as err:  # a corrupt payload: report it with the rest
            problems.append(f"cannot read {key} ({source.where(key)}): {err}")
            continue
        problem = None if is_float_dtype(stored.dtype) else check_tensor(
            key, stored, source.where(key))
        if problem is None:
            converted = stored.astype(target_dtype, copy=False)
            problem = check_tensor(key, converted, source.where(key), stored)
        if problem is not None:
            problems.append(problem)
            continue
        array = _orient(converted, leaf)
        if layer is None:
            top_level[leaf.name] = array
        else:
            stacks[leaf.name][layer] = array
    if problems:
        raise CheckpointError(source_name, problems)
    # device_put, not jnp.asarray: the latter compiles a staging program per shape and dtype.
    params: dict[str, Any] = {leaf: jax.device_put(array) for leaf, array in top_level.items()}
    params["layers"] = {leaf: jax.device_put(stack) for leaf, stack in stacks.items()}
    return params


def check_params(params: Mapping[str, Any], config: ModelConfig) -> None:
    """Raise a ValueError naming every leaf of ``params`` that is missing or mis-shaped."""
    problems = []
    for leaf in param_leaves(config):
        group, given = ("layers/", params.get("layers", {})) if leaf.per_layer else ("", params)
        shape = leaf.shape(config)
        if leaf.name not in given:
            problems.append(f"missing leaf {group}{leaf.name} (expected shape {shape})")
        elif tuple(given[leaf.name].shape) != shape:
            problems.append(f"{group}{leaf.name}: expected shape {shape}, found "
                            f"{tuple(given[leaf.name].shape)}")
    if problems:
        raise ValueError(f"params do not match config {config.name!r}:\n"
                         + "\n".join(f"  - {p}" for p in problems))


# ---------------------------------------------------------------------------------------------
# loading


class _SafetensorsSource:
    def __init__(self, handles: Mapping[str, Any], locations: Mapping[str, tuple[str, str]],
                 checksums: Mapping[str, Mapping[str, str]] | None = None):
        self._handles = handles  # file name -> open safe_open handle
        self._locations = locations  # our key -> (file name, stored tensor name)
        self._checksums = checksums or {}  # file name -> stored tensor name -> crc32

    def keys(self) -> Iterable[str]:
        return self._locations.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        file, stored = self._locations[key]
        return tuple(self._handles[file].get_slice(stored).get_shape())

    def read(self, key: str) -> np.ndarray:
        file, stored = self._locations[key]
        array = self._handles[file].get_tensor(stored)
        expected = self._checksums.get(file, {}).get(stored)
        if expected is not None and crc32_of(array) != expected:
            raise ValueError(f"checksum mismatch (crc32 {crc32_of(array)}, saved {expected}): "
                             "the file changed or is corrupt since it was written")
        return array

    def where(self, key: str) -> str:
        return f"in {self._locations[key][0]}"


def _saved_checksums(handle, path: Path, config: ModelConfig, problems: list[str]
                     ) -> dict[str, str] | None:
    """The per-tensor checksums a safetensors file written by ``save_hf_checkpoint`` carries (None
    for other files); checks the config they were saved with against ``config``."""
    text = (handle.metadata() or {}).get(CHECKSUMS_KEY)
    if text is None:
        return None
    try:
        saved = json.loads(text)
        tensors = {str(k): str(v) for k, v in saved["tensors"].items()}
        config_sum = str(saved["config"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        problems.append(f"{path.name}: unreadable checksum record in its header ({err}); the file "
                        "is corrupt")
        return None
    if config_sum != config_checksum(config):
        problems.append(f"{path.name} was saved with another model config than {CONFIG_FILE} "
                        f"now describes ({CONFIG_FILE} changed or is corrupt)")
    return tensors


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(str(path), [f"{path.name} is not valid JSON: {err}"]) from err
    if not isinstance(data, dict):
        raise CheckpointError(str(path), [f"{path.name} must hold a JSON object"])
    return data


def load_hf_config(folder: str | os.PathLike) -> ModelConfig:
    """The ``ModelConfig`` of an HF checkpoint folder (reads only ``config.json``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    raw = _read_json(folder / CONFIG_FILE, "config.json")
    return ModelConfig.from_hf_dict(raw, name=folder.name or "hf")


def load_hf_checkpoint(folder: str | os.PathLike,
                       dtype: Any = jnp.float32) -> tuple[ModelConfig, dict[str, Any]]:
    """Load ``config.json`` and the safetensors weights of an HF checkpoint folder.

    Returns ``(config, params)``; parameters are cast to ``dtype`` (float32, bfloat16 or float16).
    Raises ``FileNotFoundError`` for a missing folder, ``config.json`` or weights file, and one
    ``CheckpointError`` listing every missing key, shape mismatch and unreadable shard.
    """
    from safetensors import safe_open

    normalize_dtype(dtype)
    folder = Path(folder)
    config = load_hf_config(folder)
    index_path, single_path = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_path.is_file():
        index = _read_json(index_path, "safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(str(index_path), ["index has no 'weight_map' object"])
        stored_to_file = {str(k): str(v) for k, v in weight_map.items()}
    elif single_path.is_file():
        stored_to_file = None
    else:
        raise FileNotFoundError(f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE}")

    problems: list[str] = []
    checksums: dict[str, dict[str, str]] = {}
    with ExitStack() as stack:
        handles: dict[str, Any] = {}
        files = sorted(set(stored_to_file.values())) if stored_to_file else [SINGLE_FILE]
        for name in files:
            path = folder / name
            if not path.is_file():
                problems.append(f"missing shard file {path}")
                continue
            try:
                handles[name] = stack.enter_context(safe_open(str(path), framework="numpy"))
            except Exception as err:
                problems.append(f"unreadable safetensors file {path} (truncated or corrupt?): "
                                f"{err}")
                continue
            sums = _saved_checksums(handles[name], path, config, problems)
            if sums is not None:
                checksums[name] = sums
        in_file = {name: set(handle.keys()) for name, handle in handles.items()}
        if stored_to_file is None:
            stored_to_file = {key: SINGLE_FILE for key in in_file.get(SINGLE_FILE, ())}
        # Checkpoints of the bare decoder (``LlamaModel``) lack the ``model.`` prefix.
        bare = not any(key.startswith("model.") for key in stored_to_file)
        locations: dict[str, tuple[str, str]] = {}
        absent: set[str] = set()  # keys in a shard already reported unreadable
        for stored, file in stored_to_file.items():
            ours = f"model.{stored}" if bare and stored != "lm_head.weight" else stored
            if file not in handles:
                absent.add(ours)
            elif stored not in in_file[file]:
                problems.append(f"index lists {stored} in {file}, but that file lacks it")
                absent.add(ours)
            else:
                locations[ours] = (file, stored)
        source = _SafetensorsSource(handles, locations, checksums)
        params = assemble_params(config, source, dtype, str(folder), problems, absent)
    return config, params


# ---------------------------------------------------------------------------------------------
# saving


def to_hf_tensors(params: Mapping[str, Any], config: ModelConfig,
                  dtype: Any = None) -> Iterable[tuple[str, np.ndarray]]:
    """Yield ``(HF key, array in HF layout)`` for every tensor, one at a time."""
    check_params(params, config)
    out_dtype = None if dtype is None else normalize_dtype(dtype)

    def convert(array: Any, leaf: ParamLeaf) -> np.ndarray:
        host = np.asarray(array)
        host = host if out_dtype is None else host.astype(out_dtype, copy=False)
        return np.ascontiguousarray(_orient(host, leaf))

    leaves = param_leaves(config)
    for leaf in leaves:
        if not leaf.per_layer:
            yield leaf.hf_key, convert(params[leaf.name], leaf)
    # Leaf by leaf: one host copy of a stacked leaf at a time, and no per-layer device slicing
    # (which would compile a program per shape).
    for leaf in leaves:
        if leaf.per_layer:
            stack = np.asarray(params["layers"][leaf.name])
            for layer in range(config.num_layers):
                yield leaf.hf_key.format(layer=layer), convert(stack[layer], leaf)


def save_hf_checkpoint(params: Mapping[str, Any], config: ModelConfig,
                       folder: str | os.PathLike, *, max_shard_bytes: int | None = None,
                       dtype: Any = None) -> Path:
    """Write ``config.json`` and safetensors weights loadable by ``load_hf_checkpoint`` (and HF).

    One ``model.safetensors`` unless ``max_shard_bytes`` splits the tensors, then
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``.
    ``dtype`` casts on the way out (default: keep each leaf's dtype). Returns the folder.

    The new folder replaces the old one in one atomic step (other files in it are kept); each
    weights file records a crc32 per tensor and a checksum of the config, which
    ``load_hf_checkpoint`` verifies. Non-finite weights are refused.
    """
    from safetensors.numpy import save_file

    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool)
                                        or not isinstance(max_shard_bytes, int)
                                        or max_shard_bytes < 1):
        raise ValueError("max_shard_bytes must be a positive int or None; got "
                         f"{max_shard_bytes!r}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")

    shards = _shards(to_hf_tensors(params, config, dtype), max_shard_bytes, folder)
    stored_dtype = next(iter(shards[0].values())).dtype
    hf_config = config.to_hf_dict()
    hf_config["dtype"] = stored_dtype.name
    config_sum = config_checksum(config)

    def metadata(shard: dict[str, np.ndarray]) -> dict[str, str]:
        # "format": what transformers expects of a safetensors weights file
        sums = {key: crc32_of(array) for key, array in shard.items()}
        return {"format": "pt", CHECKSUMS_KEY: json.dumps({"config": config_sum,
                                                           "tensors": sums})}

    # Everything is written into a staging folder that then replaces ``folder`` in one atomic
    # step: a reader (or a crash) never sees new weights with an old config, or no weights.
    staging = staging_dir(folder)
    try:
        _carry_over(folder, staging)
        atomic_write_text(staging / CONFIG_FILE, json.dumps(hf_config, indent=2) + "\n")
        if len(shards) == 1:
            atomic_write(staging / SINGLE_FILE,
                         lambda tmp: save_file(shards[0], tmp, metadata(shards[0])))
        else:
            weight_map = {}
            for number, shard in enumerate(shards, start=1):
                name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
                atomic_write(staging / name,
                             lambda tmp, shard=shard: save_file(shard, tmp, metadata(shard)))
                weight_map.update({key: name for key in shard})
            total = sum(array.nbytes for shard in shards for array in shard.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write_text(staging / INDEX_FILE, json.dumps(index, indent=2) + "\n")
        swap_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _shards(tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int | None,
            folder: Path) -> list[dict[str, np.ndarray]]:
    """The tensors, checked finite, in shards of at most ``max_shard_bytes`` (one when None)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for key, array in tensors:
        problem = check_tensor(key, array, "in the params to save")
        if problem is not None:
            raise ValueError(f"refusing to save {folder}: {problem}")
        if (max_shard_bytes is not None and shards[-1]
                and shard_bytes + array.nbytes > max_shard_bytes):
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = array
        shard_bytes += array.nbytes
    return shards


def _carry_over(folder: Path, staging: Path) -> None:
    """Other files of ``folder`` (tokenizer, README) into ``staging``, by hard link (no copy);
    the weights and config it held are replaced, and a previous export with another sharding
    must not linger."""
    if not folder.is_dir():
        return
    weight_files = {CONFIG_FILE, SINGLE_FILE, INDEX_FILE}
    for path in folder.iterdir():
        if path.name in weight_files or re.fullmatch(r"model-\d+-of-\d+\.safetensors",
                                                     path.name):
            continue
        target = staging / path.name
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(path, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(path, target)


def _link_or_copy(source, target) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)
