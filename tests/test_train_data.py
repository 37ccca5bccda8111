"""Training data: tokenization as at inference, the loss mask, batching, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lragent_jax.tokenizer import ByteTokenizer
from tests.conftest import CharTokenizer, data_dir
from tests.test_train_toys import ROLES, toy_samples, write_role_dir
from train import data as data_lib


class MergingTokenizer(CharTokenizer):
    """Characters, except that "\\n#" is one token: tokenizing a joined string differs from
    tokenizing its pieces when a piece ends in a newline and the next starts with '#'."""

    merged = CharTokenizer.vocab_size

    def encode(self, text, add_bos=False):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("\n#", i):
                ids.append(self.merged)
                i += 2
            else:
                ids.append(3 + self.chars.index(text[i]))
                i += 1
        return ids


def _examples(samples, tokenizer=None, max_len=512, overlong="drop"):
    return data_lib.tokenize_samples(samples, tokenizer or CharTokenizer(), agents=ROLES,
                                     eos_id=2, max_len=max_len, overlong=overlong)


def test_loss_mask_covers_exactly_output_and_eos():
    tokenizer = CharTokenizer()
    sample = {"input": "Q: 1+2?\n### Response:\n", "output": "3"}
    examples, _ = _examples({"plan": [sample]})
    (example,) = examples
    mask = data_lib.loss_mask(example)
    assert mask.sum() == len(tokenizer.encode("3")) + 1
    assert tokenizer.decode(example.tokens[mask]) == "3<2>"  # output then EOS
    assert tokenizer.decode(example.tokens[~mask]) == sample["input"]
    # the batch gathers the hidden state one position before each masked token
    batch = data_lib.collate([example], rows=2, length=64, window=8)
    n = example.num_targets
    assert batch.label_weights[0].sum() == n and batch.label_weights[1].sum() == 0
    np.testing.assert_array_equal(batch.tokens[0, batch.label_positions[0, :n] + 1],
                                  example.tokens[mask])
    np.testing.assert_array_equal(batch.label_ids[0, :n], example.tokens[mask])


def test_segments_are_tokenized_on_their_own_as_at_inference():
    tokenizer = MergingTokenizer()
    pieces = ["Observation: x\n", "#3 Thought:\n"]
    with_segments = {"input": "".join(pieces), "output": "ok", "segments": pieces}
    (segmented,), _ = _examples({"plan": [with_segments]}, tokenizer)
    expected = tokenizer.encode(pieces[0]) + tokenizer.encode(pieces[1])
    assert segmented.tokens[:segmented.prompt_len].tolist() == expected
    # the published format has no segments: its input is tokenized whole
    (whole,), _ = _examples({"plan": [{"input": "".join(pieces), "output": "ok"}]}, tokenizer)
    assert whole.tokens[:whole.prompt_len].tolist() == tokenizer.encode("".join(pieces))
    assert whole.prompt_len == segmented.prompt_len - 1  # the merge happened only here


def test_kb_samples_tokenize_like_the_session():
    from lragent_jax.tasks.kb import KBTask

    samples = KBTask(seed=3, num_train=4, num_valid=0, num_test=0).role_samples("train")
    examples, report = _examples(samples, max_len=100_000)
    assert report.total == 0 and len(examples) == sum(map(len, samples.values()))
    tokenizer = CharTokenizer()
    first = samples["action"][0]
    example = next(e for e in examples if e.role == "action")
    assert tokenizer.decode(example.tokens[:example.prompt_len]) == first["input"]
    assert tokenizer.decode(example.tokens[example.prompt_len:]) == first["output"] + "<2>"


def test_overlong_samples_are_reported_not_silent():
    samples = {"plan": [{"input": "x" * 50, "output": "ab"}, {"input": "y" * 5, "output": "cd"}],
               "action": [{"input": "z" * 60, "output": "e"}]}
    examples, report = _examples(samples, max_len=20)
    assert len(examples) == 1 and report.dropped == {"plan": 1, "action": 1}
    assert "2 sample(s) longer than --max-len 20 were dropped" in report.summary("train")
    examples, report = _examples(samples, max_len=20, overlong="truncate")
    assert report.truncated == {"plan": 1, "action": 1} and len(examples) == 3
    for e in examples:
        assert len(e.tokens) <= 20 and e.tokens[-1] == 2
    cut = next(e for e in examples if e.role == "plan" and e.prompt_len == 17)
    assert CharTokenizer().decode(cut.tokens[cut.prompt_len:]) == "ab<2>"


def test_epoch_order_is_deterministic_and_complete():
    examples, _ = _examples(toy_samples(30))
    buckets = data_lib.bucket_lengths(64, 16)
    order = lambda epoch, seed=0: data_lib.epoch_order(  # noqa: E731
        examples, batch_size=4, buckets=buckets, seed=seed, phase=0, epoch=epoch)
    first = order(0)
    assert first == order(0)
    assert first != order(1) and first != order(0, seed=1)
    assert sorted(i for batch in first for i in batch) == list(range(len(examples)))
    # rows of a batch share a padded length except across pool boundaries
    lengths = [{data_lib.padded_length(len(examples[i].tokens), buckets) for i in b} for b in first]
    assert sum(len(s) > 1 for s in lengths) <= 2


def test_bucket_lengths_and_target_window():
    assert data_lib.bucket_lengths(1024) == (64, 128, 192, 256, 320, 448, 576, 768, 960, 1024)
    assert data_lib.bucket_lengths(100, 64) == (64, 100)
    examples, _ = _examples({"plan": [{"input": "abc", "output": "x" * 20}]})
    assert data_lib.target_window(examples, 512) == 32


def test_published_dir_missing_file_names_it(tmp_path):
    write_role_dir(tmp_path, {"plan": [], "action": []})
    with pytest.raises(data_lib.DataError, match=r"reflect\.json: role file is missing"):
        data_lib.load_published_dir(tmp_path, ROLES)
    with pytest.raises(data_lib.DataError, match="data directory not found"):
        data_lib.load_published_dir(tmp_path / "nope", ROLES)


def test_published_dir_malformed_file_and_record_are_named(tmp_path):
    write_role_dir(tmp_path, toy_samples(2))
    (tmp_path / "action.json").write_text("[{\"input\": \"a\",", encoding="utf-8")
    with pytest.raises(data_lib.DataError, match=r"action\.json: malformed JSON"):
        data_lib.load_published_dir(tmp_path, ROLES)
    records = [{"input": "a", "output": "b"}, {"input": "a"}]
    (tmp_path / "action.json").write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(data_lib.DataError, match=r"action\.json: record 1: missing 'output'"):
        data_lib.load_published_dir(tmp_path, ROLES)


def test_unknown_role_and_empty_prompt_are_refused():
    with pytest.raises(data_lib.DataError, match="roles \\['critic'\\] that are not agents"):
        _examples({"critic": [{"input": "a", "output": "b"}]})
    with pytest.raises(data_lib.DataError, match="empty prompt"):
        _examples({"plan": [{"input": "", "output": "b"}]})


def test_validation_split_is_deterministic():
    samples = toy_samples(40)
    train, valid = data_lib.split_validation(samples, 0.1, seed=0)
    assert {r: len(v) for r, v in valid.items()} == {r: 4 for r in ROLES}
    assert data_lib.split_validation(samples, 0.1, seed=0) == (train, valid)
    for role in ROLES:
        assert len(train[role]) + len(valid[role]) == 40
        assert not {s["input"] for s in train[role]} & {s["input"] for s in valid[role]}


@pytest.mark.skipif(data_dir() is None, reason="published trajectories not present")
def test_published_scienceqa_loads():
    samples = data_lib.load_published_dir(f"{data_dir()}/scienceqa", ROLES)
    assert {r: len(v) for r, v in samples.items()} == {"plan": 944, "action": 518,
                                                        "reflect": 520}
    examples, report = data_lib.tokenize_samples(
        {r: v[:20] for r, v in samples.items()}, ByteTokenizer(), agents=ROLES,
        eos_id=2, max_len=100_000)
    assert len(examples) == 60 and report.total == 0


def test_a_role_without_samples_is_refused_not_exported_untrained(tmp_path):
    samples = toy_samples(4)
    samples["reflect"] = []
    write_role_dir(tmp_path, samples)
    spec = data_lib.DataSpec(source=str(tmp_path), valid_fraction=0.0)
    with pytest.raises(data_lib.DataError, match=r"no training samples for reflect \(plan 4, "
                                                 r"action 4, reflect 0\): an untrained adapter"):
        data_lib.load_role_samples(spec, ROLES)
    # a role all of whose samples are dropped for length is reported, per role, with counts
    long = {"plan": toy_samples(2)["plan"], "action": [{"input": "x" * 90, "output": "y"}] * 3}
    examples, report = _examples(long, max_len=40)
    assert {e.role for e in examples} == {"plan"}
    assert "no example left for action (all 3 dropped); its adapter is not trained" in \
        report.summary("train")


def test_empty_outputs_are_reported_and_all_empty_refused():
    samples = {"plan": [{"input": "a?", "output": "b"}, {"input": "c?", "output": " "}],
               "action": [{"input": "d?", "output": "e"}]}
    examples, report = _examples(samples)
    assert len(examples) == 3 and report.empty_outputs == {"plan": 1}
    assert "empty output, trained on EOS alone: plan 1 of 2" in report.summary("train")
    samples["action"] = [{"input": "d?", "output": ""}, {"input": "f?", "output": ""}]
    with pytest.raises(data_lib.DataError, match=r"every output is empty for action \(2 samples\)"):
        _examples(samples)


def test_auto_view_is_mixed_only_when_every_sample_records_writers():
    samples = toy_samples(3)
    assert data_lib.auto_view(samples, ROLES) == ("mixed", "every sample records its writers")
    del samples["action"][2]["writers"]
    view, reason = data_lib.auto_view(samples, ROLES)
    assert view == "agent" and reason.startswith("action sample 2: it records no writers")


def test_shared_view_without_writers_is_refused():
    segmented = toy_samples(3)
    for items in segmented.values():  # segments, but no writers
        for s in items:
            del s["writers"]
    with pytest.raises(data_lib.DataError, match=r"--view shared needs to know who wrote .* plan: "
                                                 r"3 of 3 \(first: sample 0: it records no writers"):
        data_lib.tokenize_samples(segmented, CharTokenizer(), agents=ROLES, eos_id=2, max_len=64,
                                  data_view="shared")
    for items in segmented.values():
        for s in items:
            s["writers"] = ["env", "critic"]
    with pytest.raises(data_lib.DataError, match=r"its writers \['critic'\] are not agents"):
        data_lib.tokenize_samples(segmented, CharTokenizer(), agents=ROLES, eos_id=2, max_len=64,
                                  data_view="mixed")
