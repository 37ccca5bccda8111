"""GGUF files (llama.cpp): read, dequantize and convert to our parameter pytree; write for tests.

Tensor names map to HF keys (``GGUF_GLOBAL_NAMES``/``GGUF_LAYER_NAMES``), both from the model's leaf
table (``lragent_jax.model.PARAM_LEAVES``) that the HF loader reads too, so both formats share one
definition of the layout.

The trap: for the ``llama`` architecture, llama.cpp's converter reorders the rows of the q and k
projections (weights and biases) so its interleaved RoPE sees pairs (2i, 2i+1) where HF's
rotate-half sees (i, i + H/2). ``unpermute_qk_rows`` undoes that exactly as transformers' GGUF
loader does; without it the model runs but produces garbage. ``qwen2`` files use llama.cpp's
NeoX RoPE, whose layout is HF's already, so nothing is reordered there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lragent_jax.config import DTYPES, ModelConfig, RopeScaling
from lragent_jax.loading.hf import (CheckpointError, assemble_params, check_params, check_tensor,
                                    config_checksum, normalize_dtype, to_hf_tensors)
from lragent_jax.loading.integrity import (STAGING_MARK, clean_stale_staging, crc32_of,
                                           normal_mode)
from lragent_jax.model import PARAM_LEAVES, ParamLeaf

# Metadata key of the checksums ``save_gguf`` writes (a JSON string): {"config": sha256 of the
# model config, "tokenizer": sha256 of the tokenizer.* fields, "tensors": {name: crc32 of the
# stored bytes}}; verified at load when present. Files from elsewhere carry none.
CHECKSUMS_KEY = "lragent.checksums"

# architecture -> whether its q/k rows are stored in llama.cpp's interleaved RoPE order
ARCHITECTURES = {"llama": True, "qwen2": False}

# GGUF tensor name -> HF key, from the model's leaf table (which then gives our leaf)
GGUF_GLOBAL_NAMES = tuple((leaf.gguf_name, leaf.hf_key) for leaf in PARAM_LEAVES
                          if not leaf.per_layer)
GGUF_LAYER_NAMES = tuple((leaf.gguf_name, leaf.hf_key) for leaf in PARAM_LEAVES if leaf.per_layer)
# llama.cpp's precomputed Llama 3 RoPE frequency factors; read into ``config.rope_scaling``.
ROPE_FREQS = "rope_freqs.weight"

_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")
_GGUF_TO_HF_GLOBAL = dict(GGUF_GLOBAL_NAMES)
_GGUF_TO_HF_LAYER = {g.split(".", 2)[2]: h for g, h in GGUF_LAYER_NAMES}
_LEAF_OF_HF = {leaf.hf_key: leaf for leaf in PARAM_LEAVES}
_HF_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_to_hf_name(name: str) -> str | None:
    """The HF key of a GGUF tensor name, or None for names outside the table."""
    if name in _GGUF_TO_HF_GLOBAL:
        return _GGUF_TO_HF_GLOBAL[name]
    match = _LAYER_NAME.match(name)
    if match and match.group(2) in _GGUF_TO_HF_LAYER:
        return _GGUF_TO_HF_LAYER[match.group(2)].format(layer=int(match.group(1)))
    return None


def _leaf_and_layer(key: str) -> tuple[ParamLeaf, int | None]:
    """The table's leaf of an HF key (KeyError for keys outside it) and its layer, if any."""
    match = _HF_LAYER_KEY.match(key)
    if match:
        return _LEAF_OF_HF["model.layers.{layer}." + match.group(2)], int(match.group(1))
    return _LEAF_OF_HF[key], None


def hf_to_gguf_name(key: str) -> str:
    leaf, layer = _leaf_and_layer(key)
    return leaf.gguf_name if layer is None else leaf.gguf_name.format(layer=layer)


def _rope_heads(key: str, config: ModelConfig) -> int | None:
    """How many heads' rows RoPE rotates in the tensor of an HF key (q, k), else None."""
    leaf = _leaf_and_layer(key)[0]
    return None if leaf.rope_heads is None else getattr(config, leaf.rope_heads)


# ---------------------------------------------------------------------------------------------
# the q/k row permutation


def _check_rows(rows: np.ndarray, num_heads: int) -> int:
    if rows.ndim < 1 or rows.shape[0] % (2 * num_heads):
        raise ValueError(f"q/k rows {rows.shape} do not split into {num_heads} heads of even size")
    return rows.shape[0] // num_heads


def permute_qk_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """HF row order -> llama.cpp's (``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py).

    ``rows``: a q or k weight [out, in] or bias [out]; ``num_heads``: that projection's heads
    (query heads for q, kv heads for k). Within each head, row ``j*2 + i`` (j < H/2) takes HF row
    ``i*H/2 + j``.
    """
    head_dim = _check_rows(rows, num_heads)
    split = rows.reshape(num_heads, 2, head_dim // 2, *rows.shape[1:])
    return split.swapaxes(1, 2).reshape(rows.shape)


def unpermute_qk_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of ``permute_qk_rows`` (transformers' ``_reverse_permute_weights``)."""
    head_dim = _check_rows(rows, num_heads)
    split = rows.reshape(num_heads, head_dim // 2, 2, *rows.shape[1:])
    return split.swapaxes(1, 2).reshape(rows.shape)


# ---------------------------------------------------------------------------------------------
# Llama 3 RoPE scaling <-> rope_freqs.weight


def llama3_rope_factors(head_dim: int, rope_theta: float, scaling: RopeScaling) -> np.ndarray:
    """Per-frequency divisors [H/2] as llama.cpp's converter writes them for Llama 3.1+."""
    freqs = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(scaling.factor)
        else:
            smooth = ((old_context / wavelen - scaling.low_freq_factor)
                      / (scaling.high_freq_factor - scaling.low_freq_factor))
            factors.append(1.0 / ((1.0 - smooth) / scaling.factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _rope_scaling_from_factors(factors: np.ndarray, head_dim: int, rope_theta: float,
                               original_context: int | None) -> RopeScaling:
    # The file keeps only the factors; the Llama 3.x releases all use low=1, high=4 and an 8192
    # original context, so recognise those (with the factor read off) and refuse anything else.
    factor = float(np.max(factors))
    candidate = RopeScaling("llama3", factor=_float32_value(factor), low_freq_factor=1.0,
                            high_freq_factor=4.0,
                            original_max_position_embeddings=original_context or 8192)
    expected = llama3_rope_factors(head_dim, rope_theta, candidate)
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-5):
        raise ValueError(f"{ROPE_FREQS} does not match Llama 3 RoPE scaling (factor {factor}, "
                         "low_freq_factor 1, high_freq_factor 4, original context "
                         f"{candidate.original_max_position_embeddings}); other scalings are not "
                         "supported")
    return candidate


# ---------------------------------------------------------------------------------------------
# reading


def _open_reader(path: str | os.PathLike):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(str(path), [
            f"not a GGUF file: it starts with {magic!r}, not b'GGUF' (a model is a .gguf file "
            "or an HF checkpoint folder with config.json and safetensors weights)"])
    try:
        return gguf.GGUFReader(path)
    except Exception as err:
        raise CheckpointError(str(path), ["not a readable GGUF file (truncated or corrupt?): "
                                          f"{type(err).__name__}: {err}"]) from err


def read_metadata(reader) -> dict[str, Any]:
    """Every key/value field of an open ``gguf.GGUFReader`` as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _float32_value(value: float) -> float:
    # GGUF stores float32; its shortest repr gives back the decimal the writer meant (1e-05).
    return float(str(np.float32(value)))


def config_from_metadata(metadata: Mapping[str, Any], tensor_shapes: Mapping[str, tuple],
                         rope_factors: np.ndarray | None = None,
                         name: str | None = None) -> ModelConfig:
    """A ``ModelConfig`` from GGUF metadata plus the tensor shapes (numpy order) of the file."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture: GGUF general.architecture={arch!r}; supported: "
                         f"{sorted(ARCHITECTURES)}")

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{key}", default)

    _check_sizes(get, arch)
    hidden_size = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length") or hidden_size // num_heads)
    rope_dims = get("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ValueError(f"partial RoPE ({arch}.rope.dimension_count={rope_dims} < head_dim "
                         f"{head_dim}) is not supported")
    rope_theta = _float32_value(get("rope.freq_base", 10000.0))
    _check_layers(get, arch)
    scaling = _rope_scaling(get, rope_factors, head_dim, rope_theta)
    tokens = metadata.get("tokenizer.ggml.tokens")
    embed_shape = tensor_shapes.get("token_embd.weight")
    vocab_size = get("vocab_size") or (len(tokens) if tokens else None) or (
        embed_shape[0] if embed_shape else None)
    if vocab_size is None:
        raise ValueError("cannot tell the vocabulary size: no vocab_size, token list or "
                         "token_embd.weight")
    eos_ids = _end_ids(metadata)
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if name is None:
        basename, size = metadata.get("general.basename"), metadata.get("general.size_label")
        name = (f"{basename}-{size}".lower() if basename and size
                else metadata.get("general.name") or "gguf")
    return ModelConfig(
        name=name,
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv") or num_heads),
        head_dim=head_dim,
        rope_theta=rope_theta,
        rope_scaling=scaling,
        rms_norm_eps=_float32_value(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensor_shapes,
        qkv_bias="blk.0.attn_q.bias" in tensor_shapes,
        max_position_embeddings=int(get("context_length") or 8192),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos_ids),
    )


def _check_sizes(get: Callable[..., Any], arch: str) -> None:
    """Refuse metadata that lacks a required size or gives one per layer."""
    missing = [f"{arch}.{k}" for k in ("block_count", "embedding_length", "feed_forward_length",
                                       "attention.head_count") if get(k) is None]
    if missing:
        raise ValueError(f"GGUF metadata lacks required keys {missing}")
    for key in ("attention.head_count", "attention.head_count_kv", "feed_forward_length"):
        if isinstance(get(key), list):
            raise ValueError(f"per-layer {arch}.{key} is not supported (got a list)")


def _check_layers(get: Callable[..., Any], arch: str) -> None:
    """Refuse layers the model does not implement (sliding-window attention, experts)."""
    if get("attention.sliding_window"):
        raise ValueError(f"{arch}.attention.sliding_window={get('attention.sliding_window')} "
                         "(sliding-window attention) is not implemented")
    if get("expert_count"):
        raise ValueError(f"{arch}.expert_count={get('expert_count')} (mixture-of-experts layers)"
                         " is not implemented")


def _rope_scaling(get: Callable[..., Any], rope_factors: np.ndarray | None, head_dim: int,
                  rope_theta: float) -> RopeScaling | None:
    """Linear scaling from the metadata, or Llama 3 scaling from ``rope_freqs.weight``."""
    scaling = None
    scaling_type = get("rope.scaling.type")
    if scaling_type == "linear":
        scaling = RopeScaling("linear", factor=_float32_value(get("rope.scaling.factor")))
    elif scaling_type not in (None, "none"):
        raise ValueError(f"GGUF rope scaling type {scaling_type!r} is not supported; allowed: "
                         "linear, or Llama 3 scaling through rope_freqs.weight")
    if rope_factors is not None:
        original = get("rope.scaling.original_context_length")
        scaling = _rope_scaling_from_factors(np.asarray(rope_factors, np.float64), head_dim,
                                             rope_theta, int(original) if original else None)
    return scaling


def _end_ids(metadata: Mapping[str, Any]) -> tuple[int, ...]:
    """The distinct end-of-sequence, end-of-message and end-of-turn ids, in that order."""
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eom_token_id", "eot_token_id"):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in eos_ids:
            eos_ids.append(int(value))
    return tuple(eos_ids)


def _canonical(value: Any) -> Any:
    """A metadata value as both the writer's input and the reader's ``contents()`` spell it."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return float(np.float32(value))
    return value


def tokenizer_checksum(fields: Mapping[str, Any]) -> str:
    """sha256 of the ``tokenizer.*`` fields of a GGUF file's metadata."""
    canon = {k: _canonical(v) for k, v in fields.items() if k.startswith("tokenizer.")}
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()


def _saved_checksums(metadata: Mapping[str, Any], config: ModelConfig, path: Path,
                     problems: list[str]) -> dict[str, str] | None:
    """The per-tensor checksums of a file written by ``save_gguf`` (None for other files), after
    checking its config and tokenizer fields against theirs."""
    text = metadata.get(CHECKSUMS_KEY)
    if text is None:
        return None
    try:
        saved = json.loads(text)
        tensors = {str(k): str(v) for k, v in saved["tensors"].items()}
        sums = (str(saved["config"]), str(saved["tokenizer"]))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        problems.append(f"unreadable {CHECKSUMS_KEY} metadata ({err}); the file is corrupt")
        return None
    if sums[0] != config_checksum(config):
        problems.append("the model metadata (architecture, sizes, RoPE, special ids) differs from "
                        "what the file was written with: the file is corrupt")
    if sums[1] != tokenizer_checksum(metadata):
        problems.append("the tokenizer metadata differs from what the file was written with: the "
                        "file is corrupt")
    return tensors


class _GGUFSource:
    def __init__(self, path: Path, tensors: Mapping[str, Any], config: ModelConfig,
                 permute_qk: bool, checksums: Mapping[str, str] | None = None):
        self._path = path
        self._tensors = tensors  # HF key -> gguf ReaderTensor
        self._config = config
        self._permute_qk = permute_qk
        self._checksums = checksums or {}  # GGUF name -> crc32

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[key].shape))

    def read(self, key: str) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self._tensors[key]
        expected = self._checksums.get(tensor.name)
        if expected is not None and crc32_of(tensor.data) != expected:
            raise ValueError(f"checksum mismatch (crc32 {crc32_of(tensor.data)}, saved "
                             f"{expected}): the file changed or is corrupt since it was written")
        array = dequantize(tensor.data, tensor.tensor_type).reshape(self.shape(key))
        heads = _rope_heads(key, self._config) if self._permute_qk else None
        return array if heads is None else unpermute_qk_rows(array, heads)

    def where(self, key: str) -> str:
        return f"GGUF tensor {self._tensors[key].name} in {self._path.name}"


def _read_header(path: Path):
    """(metadata, tensors by GGUF name, config) of a GGUF file; tensor data stays on disk."""
    from gguf.quants import dequantize

    reader = _open_reader(path)
    try:
        metadata = read_metadata(reader)
    except Exception as err:
        raise CheckpointError(str(path), [f"unreadable GGUF metadata: {err}"]) from err
    by_name = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in by_name.items()}
    rope_factors = None
    if ROPE_FREQS in by_name:
        tensor = by_name[ROPE_FREQS]
        rope_factors = dequantize(tensor.data, tensor.tensor_type).reshape(-1)
    try:
        config = config_from_metadata(metadata, shapes, rope_factors)
    except ValueError as err:
        raise CheckpointError(str(path), [str(err)]) from err
    return metadata, by_name, config


def load_gguf(path: str | os.PathLike, dtype: Any = jnp.float32,
              ) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """Load a Llama/Qwen2 GGUF file: ``(config, params, metadata)``.

    Quantized tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized to ``dtype``; q/k rows are
    put back into HF order. ``metadata`` holds every key/value field (the tokenizer's included,
    for ``Tokenizer.from_gguf_metadata``).
    """
    normalize_dtype(dtype)
    path = Path(path)
    metadata, by_name, config = _read_header(path)
    problems = []
    tensors = {}
    for name, tensor in by_name.items():
        if name == ROPE_FREQS:  # already folded into config.rope_scaling
            continue
        hf_name = gguf_to_hf_name(name)
        if hf_name is None:
            problems.append(f"unexpected GGUF tensor {name} in {path.name}")
        else:
            tensors[hf_name] = tensor
    checksums = _saved_checksums(metadata, config, path, problems)
    if checksums is not None:
        unlisted = sorted(set(by_name) - set(checksums) - {ROPE_FREQS})
        if unlisted:
            problems.append(f"tensor(s) {unlisted[:3]} have no saved checksum (the tensor table "
                            "is corrupt)")
    source = _GGUFSource(path, tensors, config, ARCHITECTURES[metadata["general.architecture"]],
                         checksums)
    params = assemble_params(config, source, dtype, str(path), problems)
    return config, params, metadata


def load_gguf_config(path: str | os.PathLike) -> ModelConfig:
    """Only the ``ModelConfig`` of a GGUF file (reads no weights)."""
    return _read_header(Path(path))[2]


# ---------------------------------------------------------------------------------------------
# writing (tests and exports)

_TENSOR_DTYPES = tuple(DTYPES.values())


def save_gguf(params: Mapping[str, Any], config: ModelConfig, path: str | os.PathLike,
              tokenizer_metadata: Mapping[str, Any] | None = None, *,
              dtype: Any = None) -> Path:
    """Write ``params`` as a GGUF file that ``load_gguf`` (and llama.cpp) reads back.

    Matrices are stored in ``dtype`` (float32, float16 or bfloat16; default: the leaf's own dtype
    when it is one of those), 1-D tensors in float32, q/k rows permuted as llama.cpp expects.
    ``tokenizer_metadata``: ``tokenizer.*`` fields to embed (e.g. from ``load_gguf``'s metadata);
    bos/eos ids come from ``config``.
    """
    import gguf

    check_params(params, config)
    out_dtype = None if dtype is None else normalize_dtype(dtype)
    arch = "qwen2" if config.qkv_bias else "llama"
    crcs: dict[str, str] = {}
    permute_qk = ARCHITECTURES[arch]
    if len(config.eos_token_ids) > 3:
        raise ValueError("GGUF holds at most 3 end ids (eos, eom, eot); got "
                         f"{config.eos_token_ids}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(path)
    tmp = path.with_name(f".{path.name}{STAGING_MARK}{os.getpid()}-{os.urandom(4).hex()}")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _add_model_fields(writer, config, arch)
        _add_tokenizer_fields(writer, tokenizer_metadata or {})
        scaling = config.rope_scaling
        if scaling is not None and scaling.kind == "llama3":
            factors = llama3_rope_factors(config.head_dim, config.rope_theta, scaling)
            crcs[ROPE_FREQS] = crc32_of(factors)
            writer.add_tensor(ROPE_FREQS, factors)
        _add_weights(writer, params, config, permute_qk, out_dtype, path, crcs)
        written = {k: v.value for k, v in writer.kv_data[0].items()}
        writer.add_string(CHECKSUMS_KEY, json.dumps({
            "config": config_checksum(config), "tokenizer": tokenizer_checksum(written),
            "tensors": crcs}))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, normal_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _add_model_fields(writer, config: ModelConfig, arch: str) -> None:
    """The architecture's metadata: sizes, RoPE (and its scaling), norm epsilon, special ids."""
    import gguf

    writer.add_name(config.name)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    scaling = config.rope_scaling
    if scaling is not None and scaling.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling.factor)
    elif scaling is not None:
        writer.add_key_value(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch),
                             scaling.original_max_position_embeddings,
                             gguf.GGUFValueType.UINT32)
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
    for add, token_id in zip((writer.add_eos_token_id, writer.add_eom_token_id,
                              writer.add_eot_token_id), config.eos_token_ids):
        add(token_id)


def _add_tokenizer_fields(writer, tokenizer_metadata: Mapping[str, Any]) -> None:
    """The ``tokenizer.*`` fields, but the special ids (``config`` gives those)."""
    import gguf

    skip = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eom_token_id", "tokenizer.ggml.eot_token_id"}
    for key, value in tokenizer_metadata.items():
        if not key.startswith("tokenizer.") or key in skip:
            continue
        if isinstance(value, (list, tuple)):
            writer.add_array(key, list(value))
        else:
            writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))


def _add_weights(writer, params: Mapping[str, Any], config: ModelConfig, permute_qk: bool,
                 out_dtype: np.dtype | None, path: Path, crcs: dict[str, str]) -> None:
    """Every weight, checked finite, in llama.cpp's q/k row order where it wants it; 1-D tensors
    in float32, matrices in ``out_dtype`` (or their own dtype when GGUF has it); crc32 each."""
    import gguf

    for key, array in to_hf_tensors(params, config):
        problem = check_tensor(key, array, "in the params to save")
        if problem is not None:
            raise ValueError(f"refusing to save {path}: {problem}")
        heads = _rope_heads(key, config) if permute_qk else None
        if heads is not None:
            array = permute_qk_rows(array, heads)
        if array.ndim == 1:
            array = array.astype(np.float32)
        elif out_dtype is not None:
            array = array.astype(out_dtype)
        elif array.dtype not in _TENSOR_DTYPES:
            array = array.astype(np.float32)
        array = np.ascontiguousarray(array)
        crcs[hf_to_gguf_name(key)] = crc32_of(array)
        if array.dtype == ml_dtypes.bfloat16:  # gguf infers F32/F16 only; say BF16 explicitly
            writer.add_tensor(hf_to_gguf_name(key), array.view(np.uint16),
                              raw_shape=array.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(hf_to_gguf_name(key), array)
