"""Shared test fixtures: a character tokenizer for tiny random models."""

from __future__ import annotations

import gc
import os
import sys

import pytest

# No test of this process uses jax's persistent compilation cache, and none writes to the user's
# cache folder: a run of the eval CLI or the main job here resolves its cache to "off". The tests
# of the cache itself run in subprocesses.
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


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """After each test module, drop every compiled program. On a CPU each one holds about three
    memory mappings, and one process running the whole suite reached Linux's default limit of
    65,530 (vm.max_map_count): XLA then crashed in a later compile (a segmentation fault or an
    abort, late in the run, in whichever test compiled next). Tests share programs within a module
    only."""
    yield
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.clear_caches()
        gc.collect()


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
