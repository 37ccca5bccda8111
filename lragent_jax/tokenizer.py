"""Tokenizers: a ``tokenizers.Tokenizer`` plus the special ids and chat template the model needs.

Built from an HF folder (``tokenizer.json`` [+ ``tokenizer_config.json``]) or from the vocabulary,
merges and template a GGUF file carries in its metadata (byte-level BPE only).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

# Tokens that end an assistant turn in the chat formats of the supported model families.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

# GGUF ``tokenizer.ggml.pre`` -> how text is split before BPE, following llama.cpp's
# llama-vocab.cpp (which regexes each pre-tokenizer type uses).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS = {
    # GPT-2's regex
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo", "jais"), ("gpt2", None)),
    # each digit on its own, then GPT-2's regex (SmolLM, StarCoder)
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva"), ("digits", None)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"),
                    ("split", _LLAMA3_SPLIT)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), ("split", _QWEN2_SPLIT)),
}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE spells tokens in it)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _token_content(token: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken-like dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


@lru_cache(maxsize=16)
def _compile_template(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The same environment transformers renders chat templates in: templates from the Hub rely
    # on trim_blocks/lstrip_blocks, loop controls and these helpers.
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class Tokenizer:
    """Text <-> token ids for one model, with its special ids and chat template.

    ``encode`` adds no special tokens unless asked (``add_bos``); special tokens written in the
    text (``<|im_start|>``) are recognised as single ids, which is what rendered chat prompts need.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_tokens: Sequence[str] = (), pad_token: str | None = None,
                 chat_template: str | None = None, eos_token_ids: Iterable[int] = ()):
        self.backend = backend
        self.bos_token = bos_token
        self.chat_template = chat_template
        ids = []
        for token in eos_tokens:
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise ValueError(f"eos token {token!r} is not in the vocabulary")
            ids.append(token_id)
        ids.extend(int(i) for i in eos_token_ids)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))
        self.eos_token = (backend.id_to_token(self.eos_token_ids[0])
                          if self.eos_token_ids else None)
        self.bos_token_id = None if bos_token is None else backend.token_to_id(bos_token)
        if bos_token is not None and self.bos_token_id is None:
            raise ValueError(f"bos token {bos_token!r} is not in the vocabulary")
        self.pad_token = pad_token
        self.pad_token_id = None if pad_token is None else backend.token_to_id(pad_token)

    # ---- construction ----
    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike,
                  tokenizer_config_json: str | os.PathLike | None = None,
                  *, chat_template: str | None = None,
                  eos_token_ids: Iterable[int] = ()) -> "Tokenizer":
        """From ``tokenizer.json`` and optionally ``tokenizer_config.json`` (special tokens and
        chat template)."""
        tokenizer_json = Path(tokenizer_json)
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_json}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as err:
            raise ValueError(f"cannot read tokenizer file {tokenizer_json}: {err}") from err
        settings: dict[str, Any] = {}
        if tokenizer_config_json is not None:
            path = Path(tokenizer_config_json)
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer config not found: {path}")
            try:
                settings = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from err
        template = chat_template or settings.get("chat_template")
        if isinstance(template, list):  # several named templates: use the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        eos = _token_content(settings.get("eos_token"))
        return cls(backend, bos_token=_token_content(settings.get("bos_token")),
                   eos_tokens=(eos,) if eos else (), pad_token=_token_content(
                       settings.get("pad_token")), chat_template=template,
                   eos_token_ids=eos_token_ids)

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike) -> "Tokenizer":
        """From an HF model folder: ``tokenizer.json``, plus ``tokenizer_config.json``,
        ``chat_template.jinja`` and the end ids of ``generation_config.json`` when present."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        config_path = folder / "tokenizer_config.json"
        template_path = folder / "chat_template.jinja"
        template = (template_path.read_text(encoding="utf-8")
                    if template_path.is_file() else None)
        eos_ids: list[int] = []
        generation_path = folder / "generation_config.json"
        if generation_path.is_file():
            eos = json.loads(generation_path.read_text(encoding="utf-8")).get("eos_token_id")
            eos_ids = list(eos) if isinstance(eos, list) else ([] if eos is None else [eos])
        return cls.from_file(folder / "tokenizer.json",
                             config_path if config_path.is_file() else None,
                             chat_template=template, eos_token_ids=eos_ids)

    @classmethod
    def from_gguf_metadata(cls, reader_or_metadata: Any) -> "Tokenizer":
        """From GGUF metadata: a ``gguf.GGUFReader`` or the dict ``load_gguf`` returns.

        Byte-level BPE (``tokenizer.ggml.model == "gpt2"``): vocabulary and merges from the file,
        control tokens (type 3) as special tokens, user-defined ones (type 4) as added tokens,
        the pre-tokenizer chosen by ``tokenizer.ggml.pre``.
        """
        if hasattr(reader_or_metadata, "fields"):  # a GGUFReader
            wanted = ("tokenizer.", "general.architecture")
            metadata = {name: field.contents() for name, field in reader_or_metadata.fields.items()
                        if name.startswith(wanted)}
        elif isinstance(reader_or_metadata, Mapping):
            metadata = reader_or_metadata
        else:
            raise TypeError("expected a gguf.GGUFReader or a metadata dict; got "
                            f"{type(reader_or_metadata).__name__}")
        model_type = metadata.get("tokenizer.ggml.model")
        if model_type != "gpt2":
            raise ValueError(f"GGUF tokenizer type {model_type!r} is not supported; only "
                             "byte-level BPE ('gpt2') is. Load the tokenizer from an HF folder "
                             "instead.")
        tokens = metadata.get("tokenizer.ggml.tokens")
        merges = metadata.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise ValueError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        pre = metadata.get("tokenizer.ggml.pre") or "default"
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; allowed: "
                             f"{sorted(GGUF_PRE_TOKENIZERS)}")
        token_types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)

        alphabet = _byte_alphabet()
        spelled = set(alphabet.values())
        vocab = {}
        for index, (token, token_type) in enumerate(zip(tokens, token_types)):
            # A normal token outside the byte alphabet is stored as its text: spell it in bytes.
            # Control and user-defined tokens stay as text; they are matched whole (added below).
            if token_type not in (_CONTROL, _USER_DEFINED) and not set(token) <= spelled:
                token = "".join(alphabet[b] for b in token.encode("utf-8"))
            vocab.setdefault(token, index)
        pairs = [tuple(merge.split(" ")) for merge in merges]
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                                  byte_fallback=False))
        split_kind, split = GGUF_PRE_TOKENIZERS[pre]
        if split_kind == "gpt2":
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=True)
        elif split_kind == "digits":
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        special = [AddedToken(token, special=True, normalized=False)
                   for token, token_type in zip(tokens, token_types) if token_type == _CONTROL]
        user = [AddedToken(token, special=False, normalized=False)
                for token, token_type in zip(tokens, token_types) if token_type == _USER_DEFINED]
        backend.add_special_tokens(special)
        backend.add_tokens(user)

        def token_at(key: str) -> str | None:
            index = metadata.get(f"tokenizer.ggml.{key}")
            if index is None or not 0 <= int(index) < len(tokens):
                return None
            return tokens[int(index)]

        eos_ids = [metadata[f"tokenizer.ggml.{k}"] for k in ("eos_token_id", "eom_token_id",
                                                             "eot_token_id")
                   if metadata.get(f"tokenizer.ggml.{k}") is not None]
        return cls(backend, bos_token=token_at("bos_token_id"), pad_token=token_at(
            "padding_token_id"), chat_template=metadata.get("tokenizer.chat_template"),
            eos_token_ids=eos_ids)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
        import gguf

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        try:
            reader = gguf.GGUFReader(path)
        except Exception as err:
            raise ValueError(f"cannot read GGUF file {path} (truncated or corrupt?): {err}") \
                from err
        return cls.from_gguf_metadata(reader)

    # ---- text <-> ids ----
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str; got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos=True, but this tokenizer has no bos token")
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range 0..{self.vocab_size - 1}: {bad[:10]}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- chat ----
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_variables: Any) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the model's chat template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (none in tokenizer_config.json"
                             ", chat_template.jinja or the GGUF metadata)")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise ValueError("messages must be a list of dicts with a 'role' string and "
                             f"'content'; got {messages!r:.200}")
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            **template_variables)

    @property
    def chat_stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant turn: eos ids plus known end-of-turn tokens in the vocab."""
        ids = list(self.eos_token_ids)
        for token in END_OF_TURN_TOKENS:
            token_id = self.backend.token_to_id(token)
            if token_id is not None:
                ids.append(token_id)
        return tuple(dict.fromkeys(ids))

    @property
    def chat_stop_strings(self) -> tuple[str, ...]:
        """The text of ``chat_stop_token_ids`` (e.g. ``"<|im_end|>"``)."""
        return tuple(self.backend.decode([i], skip_special_tokens=False)
                     for i in self.chat_stop_token_ids)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos_ids={self.eos_token_ids}, chat_template={self.chat_template is not None})")


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258 (0 pad, 1 bos, 2 eos): for tiny and random-weight models, which
    have no tokenizer of their own."""

    vocab_size = 259
    bos_token_id, pad_token_id = 1, 0
    eos_token_ids = (2,)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return ([1] if add_bos else []) + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")
