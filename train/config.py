"""What a training run is: ``TrainConfig`` (everything that decides the trained adapters),
``RunOptions`` (how the run is carried out), the phases of each variant, and range checks.

Variants (``TrainConfig.variant``):
  joint:        one A per (layer, module) trained on every role's data; each sample is routed to
                its role's B (the adapter_index of its batch row).
  frozen:       the paper's recipe: phase 1 trains the first agent as a plain LoRA (its A and B);
                phase 2 trains the other agents' B with that A frozen.
  independent:  the baseline: one A per agent, all trained jointly.

Host-side only (no jax), so the command line can read its defaults without starting JAX.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lragent_jax.config import DTYPE_NAMES, DTYPES, LoraConfig, is_int, is_number
from train.data import DATA_VIEWS

VARIANTS = ("joint", "frozen", "independent")
REMAT = ("full", "dots", "none")
DEFAULT_TARGETS = ("q", "v", "o", "gate", "up", "down")


def range_text(low: float | None = None, high: float | None = None, *, low_open: bool = False,
               high_open: bool = False) -> str:
    """An interval as a message shows it: ``[0, 1)``, ``(0, inf)``."""
    opening = "(" if low_open else "["
    closing = ")" if high_open or high is None else "]"
    return (opening + ("-inf" if low is None else f"{low:g}") + ", "
            + ("inf" if high is None else f"{high:g}") + closing)


def in_range(value: float, low: float | None = None, high: float | None = None, *,
             low_open: bool = False, high_open: bool = False) -> bool:
    """Whether ``value`` is within the interval (open ends where asked)."""
    return ((low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high)))


def check_range(name: str, value: Any, *, integer: bool = False, low: float | None = None,
                high: float | None = None, low_open: bool = False, high_open: bool = False
                ) -> None:
    """Raise naming ``value`` and its allowed range unless it is a finite number (an int when
    ``integer``; never a bool) within [low, high] (open ends where asked)."""
    kind = "an int" if integer else "a number"
    ok = is_int(value) if integer else (is_number(value) and math.isfinite(value))
    if not (ok and in_range(value, low, high, low_open=low_open, high_open=high_open)):
        bounds = range_text(low, high, low_open=low_open, high_open=high_open)
        raise ValueError(f"{name} must be {kind} in {bounds}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained adapters (a resumed run must match it exactly).

    ``data_view``: what each role's prompt looks like in training ("agent", "shared", "mixed", or
    "auto": mixed when every training sample records its writers, else agent;
    ``train.data.tokenize_samples``); the command line's ``--view``.
    """

    variant: str = "joint"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    agents: tuple[str, ...] = ("plan", "action", "reflect")
    epochs: int = 1
    batch_size: int = 32
    grad_accum: int = 1
    learning_rate: float = 1e-3
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    max_len: int = 1024
    overlong: str = "drop"
    data_view: str = "agent"
    bucket_multiple: int = 64
    bucket_ratio: float = 1.25
    seed: int = 0
    compute_dtype: str = "bfloat16"
    remat: str = "full"
    max_steps: int | None = None  # per phase; cuts an epoch short (speed runs)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}; got {self.variant!r}")
        if self.remat not in REMAT:
            raise ValueError(f"remat must be one of {REMAT}; got {self.remat!r}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute dtype must be one of {sorted(DTYPES)}; got "
                             f"{self.compute_dtype!r}")
        if isinstance(self.targets, str) or isinstance(self.agents, str):
            raise ValueError("targets and agents are sequences of names, not one string")
        if "k" in self.targets:
            raise ValueError("adapters on k cannot be shared through the cache (a key adapter sits "
                             "before RoPE); drop 'k' from the targets")
        for name in ("epochs", "batch_size", "grad_accum", "max_len", "bucket_multiple"):
            check_range(name, getattr(self, name), integer=True, low=1)
        check_range("seed", self.seed, integer=True, low=0)
        if self.warmup_steps is not None:
            check_range("warmup_steps", self.warmup_steps, integer=True, low=0)
        if self.max_steps is not None:
            check_range("max_steps", self.max_steps, integer=True, low=1)
        check_range("learning_rate", self.learning_rate, low=0, low_open=True)
        check_range("warmup_ratio", self.warmup_ratio, low=0, high=1, high_open=True)
        check_range("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check_range("weight_decay", self.weight_decay, low=0)
        check_range("clip_norm", self.clip_norm, low=0, low_open=True)
        check_range("adam_b1", self.adam_b1, low=0, high=1, high_open=True)
        check_range("adam_b2", self.adam_b2, low=0, high=1, high_open=True)
        check_range("bucket_ratio", self.bucket_ratio, low=1, low_open=True)
        check_range("alpha", self.alpha, low=0, low_open=True)
        check_range("rank", self.rank, integer=True, low=1)
        if self.variant == "frozen" and len(self.agents) < 2:
            raise ValueError("the frozen variant needs at least two agents")
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"overlong must be 'drop' or 'truncate'; got {self.overlong!r}")
        if self.data_view not in DATA_VIEWS + ("auto",):
            raise ValueError(f"data_view must be one of {DATA_VIEWS + ('auto',)}; got "
                             f"{self.data_view!r}")
        self.lora  # validates targets and agents

    @property
    def lora(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, targets=tuple(self.targets),
                          agents=tuple(self.agents), shared_a=self.variant != "independent")

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.compute_dtype]

    def to_dict(self) -> dict:
        """The settings as run folders and adapter manifests record them; ``data_view`` under its
        recorded name ``view``, so earlier runs resume and earlier manifests read the same."""
        out = {("view" if k == "data_view" else k): v for k, v in dataclasses.asdict(self).items()}
        out["targets"], out["agents"] = list(self.targets), list(self.agents)
        return out


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run is carried out; none of this changes the trained adapters."""

    out_dir: str | Path | None = None
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False  # start afresh in an out_dir that holds an earlier run's results
    stop_after: int | None = None  # stop (as if killed, no save) after this step: resume tests
    log_every: int = 1
    progress: bool = True
    eval_batch_size: int | None = None
    # validation samples per epoch: None = all of them, but at most half as many as the epoch
    # trains on (so short runs validate briefly); 0 = no validation
    valid_samples: int | None = None
    mesh_data: int | None = None
    mesh_model: int = 1
    export_dtype: str = "float32"
    export_dir: str | Path | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    plot: bool = True
    handle_signals: bool = True  # SIGINT/SIGTERM: stop after the current step, checkpointed

    def __post_init__(self):
        check_range("save_every", self.save_every, integer=True, low=1)
        check_range("keep_checkpoints", self.keep_checkpoints, integer=True, low=1)
        check_range("log_every", self.log_every, integer=True, low=1)
        check_range("mesh_model", self.mesh_model, integer=True, low=1)
        for name in ("stop_after", "eval_batch_size", "mesh_data"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), integer=True, low=1)
        if self.valid_samples is not None:
            check_range("valid_samples", self.valid_samples, integer=True, low=0)
        if self.export_dtype not in DTYPE_NAMES:
            raise ValueError(f"export dtype must be one of {DTYPE_NAMES}; got "
                             f"{self.export_dtype!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run "
                             "in the folder, overwrite deletes it")


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stage of training: which agents' samples it uses and what it may change."""

    name: str
    agents: tuple[int, ...]
    train_a: bool
    train_b: tuple[int, ...]


def phases_for(config: TrainConfig) -> list[Phase]:
    everyone = tuple(range(len(config.agents)))
    if config.variant == "frozen":
        rest = everyone[1:]
        return [Phase(config.agents[0], (0,), True, (0,)),
                Phase("+".join(config.agents[1:]), rest, False, rest)]
    return [Phase("all", everyone, True, everyone)]
