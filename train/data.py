"""Role samples -> token ids with a loss mask -> length-bucketed, deterministically ordered batches.

A sample is in the role-sample format of ``lragent_jax.workflow.samples`` (its owner):
``{"input", "output"}`` (the published format) optionally with ``"segments"`` (the trajectory
pieces, joining to ``input``) and ``"writers"`` (who wrote each piece: "env" or a role). The
prompt is tokenized exactly as at inference: each segment on its own and concatenated (a role
boundary never merges BPE tokens), or ``input`` whole when there are no segments. The output is
tokenized on its own (it is what the agent generates) and followed by EOS. The loss covers the
output tokens and EOS only.

Published files carry no writers; for prompts in the ScienceQA ReAct template
``load_published_dir`` recovers them from the markers (``lragent_jax.tasks.scienceqa``), so the
shared view works on them. The shared and mixed views refuse samples without writers.

Batches: rows of one batch have similar lengths and are right-padded to one of a few bucket
lengths (so padding stays small and the number of compiled shapes stays small). The order of an
epoch depends only on (seed, phase, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# split_validation and writer_problem are the format owner's; importers of train.data find them here
from lragent_jax.workflow.samples import segment_processors, split_validation, writer_problem

KB_SOURCE = "kb"


class DataError(ValueError):
    """Training data is missing, malformed, empty, or does not fit the settings."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized role sample: ``tokens`` = prompt + output + EOS."""

    tokens: np.ndarray  # int32 [n]
    prompt_len: int
    agent: int
    role: str
    # the agent that processes each token in the shared view (None: the role's own view)
    token_agents: np.ndarray | None = None

    @property
    def num_targets(self) -> int:
        """Tokens the loss covers: the output and EOS."""
        return len(self.tokens) - self.prompt_len


def loss_mask(example: Example) -> np.ndarray:
    """Bool [n]: True at the token positions the loss predicts (output + EOS)."""
    mask = np.zeros(len(example.tokens), bool)
    mask[example.prompt_len:] = True
    return mask


@dataclasses.dataclass
class TruncationReport:
    """What happened to the samples (never silent): those longer than ``max_len`` (``total``
    counts them), outputs that are empty (the loss then covers EOS alone), and roles left with no
    examples (their adapter would not be trained)."""

    max_len: int
    policy: str
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    truncated: dict[str, int] = dataclasses.field(default_factory=dict)
    longest: int = 0
    samples: dict[str, int] = dataclasses.field(default_factory=dict)  # per role, given
    examples: dict[str, int] = dataclasses.field(default_factory=dict)  # per role, kept
    empty_outputs: dict[str, int] = dataclasses.field(default_factory=dict)  # per role, kept

    @property
    def total(self) -> int:
        return sum(self.dropped.values()) + sum(self.truncated.values())

    def summary(self, split: str) -> str | None:
        messages = []
        if self.total:
            what = self.dropped if self.policy == "drop" else self.truncated
            verb = "dropped" if self.policy == "drop" else "left-truncated"
            per_role = ", ".join(f"{role} {n}" for role, n in what.items() if n)
            messages.append(f"{split}: {self.total} sample(s) longer than --max-len {self.max_len} "
                            f"were {verb} ({per_role}; longest {self.longest} tokens)")
        empty = {r: n for r, n in self.empty_outputs.items() if n}
        if empty:
            messages.append(f"{split}: sample(s) with an empty output, trained on EOS alone: "
                            + ", ".join(f"{r} {n} of {self.examples.get(r, 0)}"
                                        for r, n in empty.items()))
        lost = [r for r, n in self.samples.items() if n and not self.examples.get(r)]
        if lost:
            messages.append(f"{split}: no example left for " + ", ".join(
                f"{r} (all {self.samples[r]} dropped)" for r in lost)
                + ("; its adapter is not trained (B stays 0)" if split == "train" else ""))
        return "; ".join(messages) if messages else None

    def to_dict(self) -> dict:
        return {"max_len": self.max_len, "policy": self.policy, "dropped": self.dropped,
                "truncated": self.truncated, "longest": self.longest, "samples": self.samples,
                "examples": self.examples, "empty_outputs": self.empty_outputs}


class SegmentEncoder:
    """``tokenizer.encode`` with a memo: trajectories repeat the same segments (instruction,
    earlier steps) many times."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._memo: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self._memo.get(text)
        if ids is None:
            ids = list(self.tokenizer.encode(text))
            if len(self._memo) < 200_000:
                self._memo[text] = ids
        return ids


def encode_sample(encode, sample: Mapping[str, Any], eos_id: int) -> tuple[list[int], list[int]]:
    """(prompt ids, output ids + [eos]) of one sample, tokenized as at inference."""
    segments = sample.get("segments")
    if segments is not None:
        prompt = [t for segment in segments for t in encode(segment)]
    else:
        prompt = list(encode(sample["input"]))
    return prompt, list(encode(sample["output"])) + [int(eos_id)]


# what each role's prompt looks like in training (``tokenize_samples``; the CLI's --view)
DATA_VIEWS = ("agent", "shared", "mixed")


def processing_agents(encode, sample: Mapping[str, Any], role: str,
                      agents: Sequence[str]) -> list[int] | None:
    """The agent that prefills each prompt token when the trajectory is run with a shared cache
    (``segment_processors``, token by token). None when the sample records no writers (or a writer
    that is not an agent; ``writer_problem`` says which)."""
    if writer_problem(sample, agents) is not None:
        return None
    out = []
    for text, processor in zip(sample["segments"], segment_processors(sample["writers"], role)):
        out += [list(agents).index(processor)] * len(encode(text))
    return out


def _writer_problems(samples: Mapping[str, Sequence[Mapping[str, Any]]],
                     agents: Sequence[str]) -> dict[str, list[tuple[int, str]]]:
    """Per role, the (index, problem) of every sample whose writers cannot give the shared view."""
    problems = {}
    for role, items in samples.items():
        bad = [(i, p) for i, s in enumerate(items) if (p := writer_problem(s, agents)) is not None]
        if bad:
            problems[role] = bad
    return problems


def auto_view(samples: Mapping[str, Sequence[Mapping[str, Any]]],
              agents: Sequence[str]) -> tuple[str, str]:
    """The view ``--view auto`` trains with, and why: "mixed" when every sample records who wrote
    each part of its prompt (the shared half needs that), else "agent"."""
    problems = _writer_problems(samples, agents)
    if not problems:
        return "mixed", "every sample records its writers"
    role, bad = next(iter(problems.items()))
    index, problem = bad[0]
    return "agent", (f"{role} sample {index}: {problem}; the shared and mixed views need writers "
                     "for every sample")


def _check_writers(samples: Mapping[str, Sequence[Mapping[str, Any]]], agents: Sequence[str],
                   data_view: str) -> None:
    problems = _writer_problems(samples, agents)
    if problems:
        detail = "; ".join(f"{role}: {len(bad)} of {len(samples[role])} (first: sample {bad[0][0]}: "
                           f"{bad[0][1]})" for role, bad in problems.items())
        raise DataError(f"--view {data_view} needs to know who wrote each part of every prompt, "
                        f"and some samples do not say: {detail}. The built-in task records writers; "
                        "published ScienceQA-format files get them from their markers; other data "
                        "can only be trained with --view agent")


def tokenize_samples(samples: Mapping[str, Sequence[Mapping[str, Any]]], tokenizer, *,
                     agents: Sequence[str], eos_id: int, max_len: int,
                     overlong: str = "drop", data_view: str = "agent",
                     seed: int = 0) -> tuple[list[Example], TruncationReport]:
    """Tokenize role samples ``{role: [sample]}``; roles must be agent names.

    ``overlong``: "drop" samples longer than ``max_len``, or "truncate" them by cutting the start of
    the prompt (the output and EOS are kept whole; a sample whose output alone is too long is
    dropped). Either way the count is reported.
    ``data_view``: "agent" (every token through the sample's role, the non-shared cache view),
    "shared" (prompt tokens through the agent that would prefill them with a shared cache, the
    base+low-rank shared view), or "mixed" (half the samples each way, by ``seed``).
    """
    if overlong not in ("drop", "truncate"):
        raise ValueError(f"overlong must be 'drop' or 'truncate'; got {overlong!r}")
    if data_view not in DATA_VIEWS:
        raise ValueError(f"data_view must be one of {DATA_VIEWS}; got {data_view!r}")
    rng = np.random.default_rng([seed, 7])
    unknown = [role for role in samples if role not in agents]
    if unknown:
        raise DataError(f"data has roles {unknown} that are not agents {list(agents)}; pass "
                        "--agents with every role of the data")
    if data_view != "agent":
        _check_writers(samples, agents, data_view)
    encode = SegmentEncoder(tokenizer)
    report = TruncationReport(max_len=max_len, policy=overlong)
    examples = []
    for role, role_samples in samples.items():
        agent = list(agents).index(role)
        report.samples[role] = len(role_samples)
        for sample in role_samples:
            prompt, target = encode_sample(encode, sample, eos_id)
            processors = None
            if data_view == "shared" or (data_view == "mixed" and rng.random() < 0.5):
                processors = processing_agents(encode, sample, role, agents)
            total = len(prompt) + len(target)
            if not prompt:
                raise DataError(f"a {role} sample has an empty prompt (input {sample['input']!r:.80})")
            if total > max_len:
                report.longest = max(report.longest, total)
                if overlong == "drop" or len(target) >= max_len:
                    report.dropped[role] = report.dropped.get(role, 0) + 1
                    continue
                report.truncated[role] = report.truncated.get(role, 0) + 1
                prompt = prompt[total - max_len:]
                if processors is not None:
                    processors = processors[total - max_len:]
            tokens = np.asarray(prompt + target, np.int32)
            token_agents = (None if processors is None else
                            np.asarray(processors + [agent] * len(target), np.int32))
            examples.append(Example(tokens, len(prompt), agent, role, token_agents))
            report.examples[role] = report.examples.get(role, 0) + 1
            if not sample["output"].strip():
                report.empty_outputs[role] = report.empty_outputs.get(role, 0) + 1
    hollow = [r for r, n in report.empty_outputs.items() if n == report.examples.get(r)]
    if hollow:
        raise DataError("every output is empty for " + ", ".join(
            f"{r} ({report.examples[r]} samples)" for r in hollow)
            + ": training would teach that role to end at once (EOS alone); check the data")
    return examples, report


def check_token_range(examples: Sequence[Example], vocab_size: int) -> None:
    for example in examples:
        if example.tokens.max(initial=0) >= vocab_size or example.tokens.min(initial=0) < 0:
            raise DataError(f"a {example.role} sample has token ids outside the model's vocabulary "
                            f"0..{vocab_size - 1}: the tokenizer does not fit the base model")


# ------------------------------------------------------------------------------------ sources


def load_published_dir(directory: str | os.PathLike, roles: Sequence[str],
                       log=None) -> dict[str, list]:
    """``{role: [sample]}`` from a directory of ``<role>.json`` files (published format). Samples in
    the ScienceQA ReAct template get their writers from its markers (``segments``/``writers``, see
    ``lragent_jax.tasks.scienceqa``); the counts are logged (``log``: default stderr). Raises
    DataError naming the file, and the record where one is at fault (also for a published-format
    prompt whose markers do not parse)."""
    from lragent_jax.tasks.scienceqa import ROLES, attach_writers, load_role_files

    directory = Path(directory)
    if not directory.exists():
        raise DataError(f"data directory not found: {directory}")
    try:
        samples = load_role_files(directory, roles)
        # the template knows the roles plan, action and reflect; others keep no writers
        known, counts = attach_writers({r: v for r, v in samples.items() if r in ROLES},
                                       source=str(directory))
    except ValueError as err:
        raise DataError(str(err)) from None
    samples = {r: known.get(r, v) for r, v in samples.items()}
    if any(counts.values()):
        (log or _stderr)(f"{directory}: writers recovered from the ReAct markers for "
                         + ", ".join(f"{r} {n} of {len(samples[r])}" for r, n in counts.items())
                         + " samples")
    return samples


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where training data comes from: the built-in KB task or a directory of role files."""

    source: str = KB_SOURCE
    valid_source: str | None = None
    valid_fraction: float = 0.05
    kb_seed: int = 0
    kb_train: int = 2000
    kb_valid: int = 200


def load_role_samples(spec: DataSpec, roles: Sequence[str]) -> tuple[dict[str, list],
                                                                      dict[str, list]]:
    """(train, valid) role samples of a data spec. Validation: ``valid_source`` when given, else
    the built-in task's valid split, else a held-out share of a directory's samples."""
    if spec.source == KB_SOURCE:
        from lragent_jax.tasks.kb import ROLES, KBTask

        missing = [r for r in ROLES if r not in roles]
        if missing:
            raise DataError(f"the built-in task has roles {list(ROLES)}; --agents lacks {missing}")
        task = KBTask(seed=spec.kb_seed, num_train=spec.kb_train, num_valid=spec.kb_valid,
                      num_test=0)
        train = task.role_samples("train")
        valid = (task.role_samples("valid") if spec.kb_valid and not spec.valid_source
                 else {r: [] for r in ROLES})
    else:
        train = load_published_dir(spec.source, roles)
        valid = {r: [] for r in train}
        if not spec.valid_source:
            train, valid = split_validation(train, spec.valid_fraction, spec.kb_seed)
    if spec.valid_source:
        valid = load_published_dir(spec.valid_source, roles)
    empty = [role for role in roles if not train.get(role)]
    if empty:
        counts = ", ".join(f"{role} {len(train.get(role, []))}" for role in roles)
        raise DataError(f"no training samples for {', '.join(empty)} ({counts}): an untrained "
                        "adapter (B = 0) would be exported as if trained; add samples or leave "
                        "the role out of --agents")
    return train, valid


def data_fingerprint(examples: Sequence[Example]) -> str:
    """Hash of every example's tokens, prompt length and agent: a resumed run must see the same."""
    h = hashlib.sha256()
    for e in examples:
        h.update(np.asarray([len(e.tokens), e.prompt_len, e.agent], np.int64).tobytes())
        h.update(e.tokens.tobytes())
        if e.token_agents is not None:
            h.update(e.token_agents.tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ batching


def bucket_lengths(max_len: int, multiple: int = 64, ratio: float = 1.25) -> tuple[int, ...]:
    """Padded lengths: multiples of ``multiple`` growing by about ``ratio``, ending at max_len."""
    if multiple < 1 or ratio <= 1.0:
        raise ValueError(f"bucket multiple must be >= 1 and ratio > 1; got {multiple}, {ratio}")
    out, length = [], multiple
    while length < max_len:
        out.append(length)
        length = max(length + multiple, int(math.ceil(length * ratio / multiple)) * multiple)
    out.append(max_len)
    return tuple(out)


def padded_length(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def target_window(examples: Sequence[Example], max_len: int, minimum: int = 8) -> int:
    """Static number of loss positions gathered per row: a power of two >= every example's
    output + EOS (logits are computed there only, never over the whole sequence)."""
    longest = max((e.num_targets for e in examples), default=1)
    return min(max_len, max(minimum, 1 << (longest - 1).bit_length()))


@dataclasses.dataclass(frozen=True)
class Batch:
    """Host arrays of one (micro)batch. Padding rows have ``lengths`` 0 and zero ``label_weights``.

    tokens [B, T]; lengths [B]; adapter_index [B]; label_positions [B, W]: positions whose
    hidden state predicts ``label_ids`` [B, W]; label_weights [B, W] 1.0 where a target is real.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    adapter_index: np.ndarray
    label_positions: np.ndarray
    label_ids: np.ndarray
    label_weights: np.ndarray
    token_agents: np.ndarray | None = None  # [B, T] when some row is in the shared view

    @property
    def num_targets(self) -> int:
        return int(self.label_weights.sum())

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def collate(examples: Sequence[Example], rows: int, length: int, window: int) -> Batch:
    """Right-pad ``examples`` into a [rows, length] batch (extra rows are padding)."""
    if len(examples) > rows:
        raise ValueError(f"{len(examples)} examples do not fit {rows} rows")
    tokens = np.zeros((rows, length), np.int32)
    lengths = np.zeros((rows,), np.int32)
    agents = np.full((rows,), -1, np.int32)
    positions = np.zeros((rows, window), np.int32)
    ids = np.zeros((rows, window), np.int32)
    weights = np.zeros((rows, window), np.float32)
    for row, e in enumerate(examples):
        n = len(e.tokens)
        if n > length or e.num_targets > window:
            raise ValueError(f"example of {n} tokens / {e.num_targets} targets does not fit "
                             f"length {length} / window {window}")
        tokens[row, :n] = e.tokens
        lengths[row] = n
        agents[row] = e.agent
        k = e.num_targets
        positions[row, :k] = np.arange(e.prompt_len - 1, n - 1)
        ids[row, :k] = e.tokens[e.prompt_len:]
        weights[row, :k] = 1.0
    token_agents = None
    if any(e.token_agents is not None for e in examples):
        token_agents = np.full((rows, length), -1, np.int32)
        for row, e in enumerate(examples):
            token_agents[row, :len(e.tokens)] = (e.token_agents if e.token_agents is not None
                                                 else e.agent)
    return Batch(tokens, lengths, agents, positions, ids, weights, token_agents)


def epoch_order(examples: Sequence[Example], *, batch_size: int, buckets: Sequence[int],
                seed: int, phase: int, epoch: int, pool_batches: int = 32) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch, in order.

    Shuffled by (seed, phase, epoch); within pools of ``pool_batches`` batches, examples are sorted
    by length so rows of a batch pad to nearly the same length; then the batch order is shuffled.
    """
    rng = np.random.default_rng([seed, phase, epoch])
    order = rng.permutation(len(examples))
    pool = batch_size * pool_batches
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool].tolist(),
                       key=lambda i: (padded_length(len(examples[i].tokens), buckets), i))
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def make_batch(examples: Sequence[Example], indices: Sequence[int], *, batch_size: int,
               buckets: Sequence[int], window: int) -> Batch:
    chosen = [examples[i] for i in indices]
    length = padded_length(max(len(e.tokens) for e in chosen), buckets)
    return collate(chosen, batch_size, length, window)


def evaluation_batches(examples: Sequence[Example], *, batch_size: int, buckets: Sequence[int],
                       window: int) -> list[tuple[list[int], Batch]]:
    """Fixed batches over all examples, sorted by length (evaluation order does not matter)."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].tokens), i))
    return [(order[i:i + batch_size], make_batch(examples, order[i:i + batch_size],
                                                 batch_size=batch_size, buckets=buckets,
                                                 window=window))
            for i in range(0, len(order), batch_size)]


def describe(examples: Sequence[Example], agents: Sequence[str]) -> dict[str, Any]:
    counts = {a: 0 for a in agents}
    targets = {a: 0 for a in agents}
    for e in examples:
        counts[agents[e.agent]] += 1
        targets[agents[e.agent]] += e.num_targets
    lengths = np.asarray([len(e.tokens) for e in examples] or [0])
    return {"samples": counts, "target_tokens": targets, "tokens": int(lengths.sum()),
            "length_p50": int(np.percentile(lengths, 50)), "length_max": int(lengths.max())}

