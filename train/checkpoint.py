"""Training checkpoints through orbax (adapters + optimizer state + a JSON progress record), the
run-folder lock, and the checks that make ``--resume`` safe.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed while
saving leaves the previous checkpoint intact (and the temporary folder is removed on the next
start). After orbax has finished, the sha256 of every file of the step goes into
``lragent_checksums.json`` inside it; a step without that file, or whose files differ from it, is
damaged. Resuming takes the newest intact step: damaged ones are moved to
``<run>/damaged_checkpoints/`` (kept for inspection, never deleted) with the reason printed.

The progress record says where the run stands (phase, epoch, step within the epoch) and what it
was made for (base model and weights fingerprint, LoRA and training settings, data fingerprint);
``check_compatible`` refuses a checkpoint made for anything else.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lragent_jax.loading.integrity import (atomic_write_text, count_nonfinite, failpoint,
                                           host_name, sha256_file)

CHECKSUMS = "lragent_checksums.json"
LOCK_FILE = "run.lock"
DAMAGED = "damaged_checkpoints"


class CheckpointMismatch(ValueError):
    """A checkpoint was made for another base model, adapter config, data or settings."""


class CheckpointDamaged(ValueError):
    """No intact checkpoint is left to resume from."""


class RunFolderLocked(ValueError):
    """Another process is writing to the run folder."""


@dataclasses.dataclass
class Progress:
    """Where a run stands, at a step boundary. A checkpoint taken when an epoch's steps are done
    (``step_in_epoch`` = the epoch's step count) precedes that epoch's validation, which a resumed
    run therefore does (again)."""

    global_step: int = 0
    phase: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    finished: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: Any) -> "Progress":
        if not isinstance(record, dict):
            raise ValueError(f"progress record is {type(record).__name__}, not an object")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - set(fields))
        if unknown:
            raise ValueError(f"progress record has unknown fields {unknown}")
        for name in ("global_step", "phase", "epoch", "step_in_epoch"):
            value = record.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"progress field {name!r} is {value!r}, not an int >= 0")
        return cls(**record)


class Checkpointer:
    """A folder of step checkpoints (orbax ``CheckpointManager``) with per-step checksums."""

    def __init__(self, directory: str | Path, *, keep: int = 3):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._keep = keep
        self.directory = Path(directory).absolute()
        self._open()

    def _open(self) -> None:
        ocp = self._ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                               enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as err:
            raise CheckpointDamaged(f"cannot open the checkpoint folder {self.directory}: "
                                    f"{type(err).__name__}: {err}; check the folder is readable "
                                    "and writable, or start afresh with --overwrite") from None

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, state: dict, progress: Progress, identity: dict) -> None:
        """Write ``state`` at ``step``; refuses non-finite adapters (they must never be resumed)."""
        bad = _nonfinite_leaves(state["adapters"])
        if bad:
            raise FloatingPointError(f"refusing to checkpoint step {step}: non-finite adapters in "
                                     f"{bad[:4]}")
        ocp = self._ocp
        record = {"progress": progress.to_dict(), "identity": identity}
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)), force=True)
            self.manager.wait_until_finished()
        except Exception as err:
            raise CheckpointDamaged(f"cannot write checkpoint {self.step_dir(step)}: "
                                    f"{type(err).__name__}: {err}; check free space and "
                                    "permissions of the run folder") from err
        failpoint("checkpoint.written")
        if jax.process_index() == 0:
            folder = self.step_dir(step)
            sums = {str(p.relative_to(folder)): sha256_file(p)
                    for p in sorted(folder.rglob("*")) if p.is_file() and p.name != CHECKSUMS}
            atomic_write_text(folder / CHECKSUMS, json.dumps(sums, indent=1) + "\n")
        failpoint("checkpoint.done")

    def verify(self, step: int) -> str | None:
        """Why checkpoint ``step`` is damaged, or None when its files match their checksums."""
        folder = self.step_dir(step)
        try:
            sums = json.loads((folder / CHECKSUMS).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return f"{CHECKSUMS} is missing (the save did not finish)"
        except (OSError, ValueError) as err:
            return f"{CHECKSUMS} is unreadable ({err})"
        if not isinstance(sums, dict) or not sums:
            return f"{CHECKSUMS} is malformed"
        for name, expected in sums.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if sha256_file(path) != expected:
                return f"{name} differs from its checksum (the file changed or is corrupt)"
        return None

    def read_record(self, step: int) -> dict:
        ocp = self._ocp
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                record=ocp.args.JsonRestore()))
            record = restored["record"]
            Progress.from_dict(record["progress"])
            if not isinstance(record["identity"], dict):
                raise ValueError("identity is not an object")
        except Exception as err:
            raise CheckpointDamaged(f"checkpoint {self.step_dir(step)} is unreadable: "
                                    f"{type(err).__name__}: {err}") from None
        return record

    def restore(self, step: int, target: dict) -> tuple[dict, Progress]:
        """The state at ``step`` shaped (and sharded) like ``target``, and its progress."""
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
        except Exception as err:
            raise CheckpointDamaged(f"checkpoint {self.step_dir(step)} is unreadable: "
                                    f"{type(err).__name__}: {err}") from None
        bad = _nonfinite_leaves(restored["state"])
        if bad:
            raise CheckpointDamaged(f"checkpoint {self.step_dir(step)} holds non-finite values "
                                    f"in {bad[:4]}")
        return restored["state"], Progress.from_dict(restored["record"]["progress"])

    def restore_latest(self, target: dict, identity: dict,
                       say: Callable[[str], None]) -> tuple[int, dict, Progress] | None:
        """(step, state, progress) of the newest intact checkpoint, or None when there is none.

        Damaged checkpoints (unfinished, changed files, unreadable) are moved aside with the
        reason said; one made for another run raises ``CheckpointMismatch``; if every checkpoint
        is damaged, ``CheckpointDamaged`` says what to do."""
        skipped = []
        for step in reversed(self.steps()):
            try:
                problem = self.verify(step)
                if problem is not None:
                    raise CheckpointDamaged(f"checkpoint {self.step_dir(step)}: {problem}")
                record = self.read_record(step)
                check_compatible(record["identity"], identity, self.step_dir(step))
                state, progress = self.restore(step, target)
                return step, state, progress
            except CheckpointDamaged as err:
                moved = self._set_aside(step)
                say(f"warning: skipping damaged {err} (moved to {moved})")
                skipped.append(str(err))
        if skipped:
            raise CheckpointDamaged(
                f"no intact checkpoint in {self.directory}:\n  " + "\n  ".join(skipped)
                + f"\nthe damaged ones were moved to {self.directory.parent / DAMAGED}; start "
                  "afresh with --overwrite (or another --out)")
        return None

    def _set_aside(self, step: int) -> Path:
        target = self.directory.parent / DAMAGED / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.step_dir(step), target)
        self.manager.close()
        self._open()  # forget the step
        return target

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_compatible(saved: dict, current: dict, directory: Path | str) -> None:
    """Raise naming every difference between a checkpoint's identity and this run's."""
    problems = []
    base_saved, base_now = saved.get("base_model", {}), current["base_model"]
    if base_saved.get("fingerprint") != base_now["fingerprint"]:
        problems.append(f"base model: the checkpoint was made for {base_saved.get('description')}"
                        f", this run uses {base_now['description']}")
    elif "weights" in base_saved and base_saved["weights"] != base_now.get("weights"):
        problems.append("base model: same architecture, but the checkpoint was made on other "
                        f"weights ({base_saved.get('source')}; this run loads "
                        f"{base_now.get('source')})")
    for key, label in (("lora", "adapter config"), ("train", "training settings"),
                       ("data", "training data")):
        old, new = saved.get(key), current[key]
        if old != new:
            if isinstance(old, dict) and isinstance(new, dict):
                diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                        if old.get(k) != new.get(k)}
                detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            else:
                detail = f"checkpoint {old!r} vs now {new!r}"
            problems.append(f"{label} differ ({detail})")
    if problems:
        raise CheckpointMismatch(f"cannot resume from {directory}: it was made for another run:\n  "
                                 + "\n  ".join(problems)
                                 + "\n(use another --out folder, or the settings of that run)")


def _nonfinite_leaves(tree) -> list[str]:
    """The paths of the leaves of ``tree`` that hold a NaN or Inf."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(path) for path, leaf in leaves
            if count_nonfinite(np.asarray(jax.device_get(leaf)))]


def identity_record(base_model: dict, lora: Any, train: dict, data: str) -> dict[str, Any]:
    return {"base_model": base_model, "lora": lora, "train": train, "data": data}


# ------------------------------------------------------------------------------------ the lock

_HELD: dict[Path, list] = {}  # lock path -> [open file, nesting count]


class RunLock:
    """``<run>/run.lock``: one writer per run folder.

    An exclusive ``flock`` on the file, which the kernel drops when its process ends however it
    ends (so a killed run never leaves a stale lock behind); the file names the owner (pid, host,
    start time, command) for the message a second writer gets. Re-entrant within one process.
    """

    def __init__(self, folder: str | Path, command: str = ""):
        self.path = (Path(folder) / LOCK_FILE).absolute()
        self.command = command

    def acquire(self) -> "RunLock":
        held = _HELD.get(self.path)
        if held is not None:
            held[1] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read()
            handle.close()
            try:
                info = json.loads(owner)
                who = (f"pid {info['pid']} on {info['host']}, started {info['started']}: "
                       f"{info.get('command') or '?'}")
            except (ValueError, KeyError, TypeError):
                who = "owner unknown"
            raise RunFolderLocked(f"{self.path.parent} is in use by another training run ({who});"
                                  " wait for it to finish, or pass another --out") from None
        except OSError as err:
            handle.close()
            raise RunFolderLocked(f"cannot lock {self.path}: {err}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": host_name(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": self.command}) + "\n")
        handle.flush()
        _HELD[self.path] = [handle, 1]
        return self

    def release(self) -> None:
        held = _HELD.get(self.path)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.path]
            held[0].seek(0)
            held[0].truncate()  # the file stays (unlinking it would race a new owner)
            held[0].close()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_run_outputs(folder: Path, names: tuple[str, ...]) -> None:
    """Delete earlier results of a run folder (``--overwrite``), under the run's lock."""
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
