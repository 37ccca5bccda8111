"""Shared test fixtures: a character tokenizer for tiny random models."""

from __future__ import annotations

import os

import pytest

# No test of this process uses jax's persistent compilation cache, and none writes to the user's
# cache folder: a run of the eval CLI or the main job here resolves its cache to "off". jax 0.11.2
# crashed (segmentation faults, in a compile or a cache write) late in full CI runs once the CPU
# cache had been used in the pytest process. The tests of the cache itself run in subprocesses.
os.environ["LRAGENT_COMPILATION_CACHE"] = "off"
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # read by jax when it is imported


class CharTokenizer:
    """ids: 0 pad, 1 bos, 2 eos, 3.. printable ASCII (32..126) and newline."""

    chars = "\n" + "".join(chr(c) for c in range(32, 127))
    vocab_size = 3 + len(chars)
    bos_token_id = 1
    eos_token_ids = (2,)
    pad_token_id = 0

    def encode(self, text, add_bos=False):
        ids = [3 + self.chars.index(c) for c in text]
        return ([1] if add_bos else []) + ids

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.chars[i - 3] if i >= 3 else ("" if skip_special_tokens else f"<{i}>")
                       for i in ids)


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


def data_dir():
    """The published trajectories folder, or None when it is absent."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.environ.get("LRAGENT_DATA_DIR"),
                  os.path.join(here, "..", "..", "shared", "data", "lragent-trajectories")]
    for c in candidates:
        if c and os.path.isdir(c):
            return os.path.abspath(c)
    return None
