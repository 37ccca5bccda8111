"""Training checkpoints through orbax: adapters + optimizer state + a JSON progress record.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed while
saving leaves the previous checkpoint intact. The progress record says where the run stands (phase,
epoch, step within the epoch) and what it was made for (base model fingerprint, LoRA and training
settings, data fingerprint); ``check_compatible`` refuses a checkpoint made for anything else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax


class CheckpointMismatch(ValueError):
    """A checkpoint was made for another base model, adapter config, data or settings."""


@dataclasses.dataclass
class Progress:
    """Where a run stands; always at a step boundary, with epoch-end validation already done."""

    global_step: int = 0
    phase: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    finished: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Checkpointer:
    """A folder of step checkpoints (orbax ``CheckpointManager``)."""

    def __init__(self, directory: str | Path, *, keep: int = 3):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, progress: Progress, identity: dict) -> None:
        ocp = self._ocp
        record = {"progress": progress.to_dict(), "identity": identity}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)), force=True)
        self.manager.wait_until_finished()

    def read_record(self, step: int) -> dict:
        ocp = self._ocp
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                record=ocp.args.JsonRestore()))
        except Exception as err:
            raise CheckpointMismatch(f"checkpoint {self.directory}/{step} is unreadable: "
                                     f"{type(err).__name__}: {err}") from None
        return restored["record"]

    def restore(self, step: int, target: dict) -> tuple[dict, Progress]:
        """The state at ``step`` shaped (and sharded) like ``target``, and its progress."""
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
        return restored["state"], Progress(**restored["record"]["progress"])

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


def identity_record(base_model: dict, lora: Any, train: dict, data: str) -> dict[str, Any]:
    return {"base_model": base_model, "lora": lora, "train": train, "data": data}
