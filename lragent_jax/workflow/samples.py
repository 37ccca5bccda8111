"""The role-sample format: one training sample per role turn, in memory and as ``<role>.json`` files.

A sample is a dict (the published format, ``input`` and ``output``, plus optional segmentation)::

    "input":    str        the trajectory before the turn's output (the prompt)
    "output":   str        what the role wrote in that turn
    "role":     str        who wrote ``output`` (optional: a file holds one role's samples)
    "segments": [str]      the trajectory pieces before the output, joining to ``input``
    "writers":  [str]      who wrote each piece: ``"env"`` or a role (present with ``segments``)

A role file ``<role>.json`` is a JSON list of samples. Episodes of this library's workflows give
every field (``per_role_samples``); published files give ``input`` and ``output`` only, and
``lragent_jax.tasks.scienceqa`` recovers segments and writers from their markers
(``with_writers``). Who prefills each piece with a shared cache (``segment_processors``) is what
the shared training view needs; ``writer_problem`` says why a sample cannot give it.

Host-side only: no jax (numpy for the validation split).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lragent_jax.workflow.types import ENV, EpisodeRecord, Segment

Samples = dict[str, list[dict[str, Any]]]  # role -> its samples


def sample_from_segments(before: Sequence[Segment], output: str,
                         role: str | None = None) -> dict[str, Any]:
    """The sample of a turn whose output follows the segments ``before``."""
    sample: dict[str, Any] = {"input": "".join(s.text for s in before), "output": output}
    if role is not None:
        sample["role"] = role
    return with_writers(sample, before)


def with_writers(sample: Mapping[str, Any], segments: Sequence[Segment]) -> dict[str, Any]:
    """``sample`` with ``segments``/``writers`` taken from ``segments`` (which join to its input)."""
    return {**sample, "segments": [s.text for s in segments],
            "writers": [s.writer for s in segments]}


def per_role_samples(record: EpisodeRecord) -> list[dict[str, Any]]:
    """One sample per role turn of an episode, with every field: ``{"input", "output", "role",
    "segments", "writers"}`` where ``"".join(segments) == input`` (the text before the turn's
    output) and ``writers[i]`` wrote ``segments[i]``."""
    return [sample_from_segments(record.segments[:i], segment.text, segment.writer)
            for i, segment in enumerate(record.segments) if segment.writer != ENV]


def group_by_role(records: Sequence[EpisodeRecord], roles: Sequence[str]) -> Samples:
    """``{role: [sample]}`` of every role turn of ``records`` (roles in the order given)."""
    samples: Samples = {role: [] for role in roles}
    for record in records:
        for sample in per_role_samples(record):
            samples[sample["role"]].append(sample)
    return samples


def sample_problem(record: Any) -> str | None:
    """Why ``record`` is not a sample of this format, or None when it is one."""
    if not isinstance(record, dict):
        return f"expected an object; got {type(record).__name__}"
    for key in ("input", "output"):
        if key not in record:
            return f"missing {key!r}"
        if not isinstance(record[key], str):
            return f"{key!r} must be a string; got {type(record[key]).__name__}"
    for key in ("segments", "writers"):
        if key in record and (not isinstance(record[key], list)
                              or not all(isinstance(s, str) for s in record[key])):
            return f"{key!r} must be a list of strings"
    if "segments" in record and "".join(record["segments"]) != record["input"]:
        return "'segments' do not join to 'input'"
    if "writers" in record and len(record["writers"]) != len(record.get("segments", ())):
        return "'writers' and 'segments' differ in length"
    return None


def load_role_files(directory: str | os.PathLike, roles: Sequence[str]) -> Samples:
    """Reads ``<role>.json`` for each role: a JSON list of samples (``sample_problem`` checks
    each). Raises ValueError naming the file (and record index) on any problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory of role files")
    result = {}
    for role in roles:
        path = directory / f"{role}.json"
        if not path.is_file():
            raise ValueError(f"{path}: role file is missing")
        data = read_json_list(path, "records")
        for index, record in enumerate(data):
            problem = sample_problem(record)
            if problem:
                raise ValueError(f"{path}: record {index}: {problem}")
        result[role] = data
    return result


def read_json_list(path: Path, what: str) -> list:
    """The JSON list in the file ``path``; ValueError naming the file when it holds none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: malformed JSON: {error}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {what}; got {type(data).__name__}")
    return data


def write_role_files(directory: str | os.PathLike,
                     samples: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Path]:
    """Writes ``<role>.json`` for each role of ``samples`` (each file replaced in one rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, items in samples.items():
        path = directory / f"{role}.json"
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(list(items), ensure_ascii=False, indent=1) + "\n",
                             encoding="utf-8")
        os.replace(temporary, path)
        paths[role] = path
    return paths


def writer_problem(sample: Mapping[str, Any], agents: Sequence[str]) -> str | None:
    """Why the shared view cannot be built for a sample, or None when it can."""
    segments, writers = sample.get("segments"), sample.get("writers")
    if segments is None or writers is None:
        return "it records no writers ('segments' and 'writers')"
    if len(segments) != len(writers):
        return f"it has {len(segments)} segments but {len(writers)} writers"
    unknown = sorted({w for w in writers if w != ENV and w not in agents})
    if unknown:
        return f"its writers {unknown} are not agents {list(agents)}"
    return None


def segment_processors(writers: Sequence[str], role: str) -> list[str]:
    """The role that prefills each segment when the trajectory runs with a shared cache: a role's
    own segment is processed by that role; env text by the role whose turn appended it (the next
    role segment's writer, or ``role``, the sample's own, for the text right before its output)."""
    per_segment, next_role = [], role
    for writer in reversed(writers):
        if writer != ENV:
            next_role = writer
        per_segment.append(next_role)
    per_segment.reverse()
    return per_segment


def split_validation(samples: Mapping[str, list], fraction: float,
                     seed: int) -> tuple[dict[str, list], dict[str, list]]:
    """Deterministic per-role split off of a validation share (for data without a valid split)."""
    import numpy as np

    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"valid fraction must be in [0, 1); got {fraction}")
    train, valid = {}, {}
    for role, items in samples.items():
        digest = int(hashlib.sha256(f"{seed}:{role}".encode()).hexdigest()[:8], 16)
        order = np.random.default_rng(digest).permutation(len(items))
        count = int(round(fraction * len(items)))
        valid[role] = [items[i] for i in sorted(order[:count])]
        train[role] = [items[i] for i in sorted(order[count:])]
    return train, valid
