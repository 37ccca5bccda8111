"""Training all role adapters of one base model: loss, optimizer, phases, the step loop.

Variants (``TrainConfig.variant``):
  joint:        one A per (layer, module) trained on every role's data; each sample is routed to
                its role's B (the adapter_index of its batch row).
  frozen:       the paper's recipe: phase 1 trains the first agent as a plain LoRA (its A and B);
                phase 2 trains the other agents' B with that A frozen.
  independent:  the baseline: one A per agent, all trained jointly.

Base weights are cast once to the compute dtype (bf16 by default); adapters and optimizer state stay
float32 and are cast inside the forward. Logits are computed only at the loss positions (output +
EOS of each row), so a [B, T, V] float32 tensor is never built.

Faults: the run folder is locked against a second writer; a step's record is written before the
checkpoint that includes it, and each epoch is checkpointed before its validation, so a run killed
anywhere resumes to the same adapters with every step logged once; a NaN/Inf loss, gradient norm or
adapter stops the run before that step is saved; SIGINT/SIGTERM stop it after the current step,
checkpointed. Validation is capped at half the samples an epoch trains on (short runs stay short).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lragent_jax.adapters_io import (config_fingerprint, describe_model, save_adapters,
                                     weights_fingerprint)
from lragent_jax.config import LoraConfig, ModelConfig, is_int, is_number
from lragent_jax.lora import count_parameters, expected_parameter_count, init_adapters
from lragent_jax.model import forward_hidden, logits_from_hidden
from lragent_jax.sharding import DATA, make_mesh, replicate, shard_params
from train import data as data_lib
from lragent_jax.loading.integrity import atomic_write_text, failpoint
from train.checkpoint import Checkpointer, Progress, identity_record

VARIANTS = ("joint", "frozen", "independent")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "loss.png", "adapters")


def check_range(name: str, value: Any, *, integer: bool = False, low: float | None = None,
                high: float | None = None, low_open: bool = False, high_open: bool = False
                ) -> None:
    """Raise naming ``value`` and its allowed range unless it is a finite number (an int when
    ``integer``; never a bool) within [low, high] (open ends where asked)."""
    kind = "an int" if integer else "a number"
    bounds = ("(" if low_open else "[") + ("-inf" if low is None else f"{low:g}") + ", " + (
        "inf" if high is None else f"{high:g}") + (")" if high_open or high is None else "]")
    ok = is_int(value) if integer else (is_number(value) and math.isfinite(value))
    if ok:
        ok = ((low is None or (value > low if low_open else value >= low))
              and (high is None or (value < high if high_open else value <= high)))
    if not ok:
        raise ValueError(f"{name} must be {kind} in {bounds}; got {value!r}")
REMAT = ("full", "dots", "none")
DEFAULT_TARGETS = ("q", "v", "o", "gate", "up", "down")
_init_adapters = jax.jit(init_adapters, static_argnums=(1, 2))
_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained adapters (a resumed run must match it exactly)."""

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
    view: str = "agent"
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
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute dtype must be one of {sorted(_DTYPES)}; got "
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
        if self.view not in data_lib.VIEWS + ("auto",):
            raise ValueError(f"view must be one of {data_lib.VIEWS + ('auto',)}; got {self.view!r}")
        self.lora  # validates targets and agents

    @property
    def lora(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, targets=tuple(self.targets),
                          agents=tuple(self.agents), shared_a=self.variant != "independent")

    @property
    def dtype(self):
        return _DTYPES[self.compute_dtype]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
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
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export dtype must be one of {EXPORT_DTYPES}; got "
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


def update_mask(lora: LoraConfig, phase: Phase) -> dict:
    """Multipliers (broadcastable to each adapter leaf) that zero what a phase must not change."""
    b_mask = np.zeros((1, lora.num_agents, 1, 1), np.float32)
    b_mask[:, list(phase.train_b)] = 1.0
    return {m: {"a": np.float32(phase.train_a), "b": b_mask} for m in lora.targets}


def lr_schedule(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup from 0, then cosine decay to ``lr * min_lr_ratio`` over the phase's steps
    (optax's ``warmup_cosine_decay_schedule``, evaluated in plain Python: a jnp schedule read with
    float() would wait for the device to finish every queued step)."""
    peak, end = config.learning_rate, config.learning_rate * config.min_lr_ratio
    warmup = (config.warmup_steps if config.warmup_steps is not None
              else int(round(config.warmup_ratio * total_steps)))
    warmup = min(warmup, max(total_steps - 1, 0))
    decay = max(total_steps, warmup + 1) - warmup

    def schedule(step: int) -> float:
        if step < warmup:
            return peak * step / warmup
        progress = min(step - warmup, decay) / decay
        return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return schedule


def make_optimizer(clip_norm: float, b1: float, b2: float,
                   weight_decay: float) -> optax.GradientTransformation:
    """Global-norm clip -> Adam -> decoupled weight decay: AdamW without its learning rate, which
    the step applies (with the phase's update mask) so that the schedule and the mask are inputs
    of one compiled step rather than constants baked into a new one per phase."""
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.scale_by_adam(b1=b1, b2=b2),
                       optax.add_decayed_weights(weight_decay))


# ------------------------------------------------------------------------------------ loss


def training_attention(dtype, config: ModelConfig) -> str:
    """cuDNN's fused, differentiable attention on a GPU in half precision (head dim <= 128);
    the plain-JAX reference elsewhere. The Pallas kernels are forward-only."""
    if (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and config.head_dim <= 128):
        return "cudnn"
    return "reference"


def loss_terms(adapters: dict, params: dict, batch: Mapping[str, jax.Array], *,
               config: ModelConfig, remat: str = "full"):
    """Per-row sums over the loss positions: (nll [B], targets [B], all targets greedy-correct [B]).

    Only the ``W`` gathered positions of each row get logits: [B, W, V] instead of [B, T, V].
    """
    if "token_agents" in batch:
        # shared view: each prompt token goes through the agent that would prefill it, and each
        # query applies its own B to the low-rank values (base+low-rank shared cache semantics)
        hidden, _ = forward_hidden(params, batch["tokens"], config=config, adapters=adapters,
                                   adapter_index=batch["token_agents"], lengths=batch["lengths"],
                                   bake_v=False,
                                   attn_impl=training_attention(params["embed"].dtype, config),
                                   remat=remat)
    else:
        hidden, _ = forward_hidden(params, batch["tokens"], config=config, adapters=adapters,
                                   adapter_index=batch["adapter_index"], lengths=batch["lengths"],
                                   attn_impl=training_attention(params["embed"].dtype, config),
                                   remat=remat)
    picked = jnp.take_along_axis(hidden, batch["label_positions"][..., None], axis=1)  # [B, W, D]
    logits = logits_from_hidden(params, picked, config)  # f32 [B, W, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    target_logp = jnp.take_along_axis(logp, batch["label_ids"][..., None], axis=-1)[..., 0]
    weights = batch["label_weights"]
    nll = -jnp.sum(target_logp * weights, axis=-1)
    correct = (jnp.argmax(logits, axis=-1) == batch["label_ids"]) | (weights == 0)
    return nll, jnp.sum(weights, axis=-1), jnp.all(correct, axis=-1)


def _grad_fn(config: ModelConfig, remat: str):
    def summed(adapters, params, batch):
        nll, count, _ = loss_terms(adapters, params, batch, config=config, remat=remat)
        return jnp.sum(nll), jnp.sum(count)

    return jax.value_and_grad(summed, has_aux=True)


class StepFunctions:
    """The jitted pieces of a training step (compiled once per batch shape).

    ``apply`` masks the gradients before clipping (frozen parts must not count in the norm) and
    the updates after AdamW (weight decay must not move frozen parts either); it also says
    whether the new adapters are all finite.
    """

    def __init__(self, model_config: ModelConfig, remat: str, optimizer, adapter_sharding):
        grad_fn = _grad_fn(model_config, remat)

        def gradients(adapters, params, batch):
            (loss_sum, count), grads = grad_fn(adapters, params, batch)
            return grads, loss_sum, count

        def accumulate(acc, adapters, params, batch):
            grads, loss_sum, count = gradients(adapters, params, batch)
            return jax.tree.map(jnp.add, acc, grads), loss_sum, count

        def apply(adapters, opt_state, acc, count, learning_rate, mask):
            grads = jax.tree.map(lambda g, m: g * m / jnp.maximum(count, 1.0), acc, mask)
            updates, opt_state = optimizer.update(grads, opt_state, adapters)
            updates = jax.tree.map(lambda u, m: -learning_rate * u * m, updates, mask)
            adapters = optax.apply_updates(adapters, updates)
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                        for x in jax.tree.leaves(adapters)]))
            return adapters, opt_state, optax.tree.norm(grads), finite

        def evaluate(adapters, params, batch):
            return loss_terms(adapters, params, batch, config=model_config, remat="none")

        self.optimizer = optimizer
        self.gradients = jax.jit(gradients, out_shardings=(adapter_sharding, None, None))
        self.accumulate = jax.jit(accumulate, donate_argnums=0,
                                  out_shardings=(adapter_sharding, None, None))
        self.apply = jax.jit(apply, donate_argnums=(0, 1))
        # per-row results replicated: with several processes each one reads every row
        self.evaluate = jax.jit(evaluate, out_shardings=adapter_sharding)


@functools.lru_cache(maxsize=8)
def step_functions(model_config: ModelConfig, config: TrainConfig,
                   adapter_sharding) -> StepFunctions:
    """Cached on what the compiled steps depend on, so that runs in one process share them."""
    return _step_functions(model_config, config.remat, config.clip_norm, config.adam_b1,
                           config.adam_b2, config.weight_decay, adapter_sharding)


@functools.lru_cache(maxsize=8)
def _step_functions(model_config, remat, clip_norm, b1, b2, weight_decay, adapter_sharding):
    optimizer = make_optimizer(clip_norm, b1, b2, weight_decay)
    return StepFunctions(model_config, remat, optimizer, adapter_sharding)


# ------------------------------------------------------------------------------------ placement


class Placement:
    """Where arrays live: one (data, model) mesh; batch rows on ``data``, base weights optionally
    sharded over ``model``, adapters and optimizer state replicated."""

    def __init__(self, mesh_data: int | None = None, mesh_model: int = 1):
        devices = jax.devices()
        if mesh_data is not None:
            if mesh_data < 1 or mesh_data * mesh_model > len(devices):
                raise ValueError(f"mesh data={mesh_data} x model={mesh_model} needs "
                                 f"{mesh_data * mesh_model} devices; {len(devices)} available")
            devices = devices[:mesh_data * mesh_model]
        self.mesh = make_mesh(data=mesh_data, model=mesh_model, devices=devices)
        self.data_size = self.mesh.shape[DATA]
        self.replicated = NamedSharding(self.mesh, P())

    def params(self, params: dict, config: ModelConfig) -> dict:
        if self.mesh.shape["model"] > 1:
            return shard_params(params, config, self.mesh)
        return replicate(params, self.mesh)

    def replicate(self, tree):
        return replicate(tree, self.mesh)

    def batch(self, batch: data_lib.Batch) -> dict:
        """Global arrays with rows split over the data axis (every process holds the whole host
        batch, so this works on several hosts as well)."""
        out = {}
        for name, array in batch.arrays().items():
            spec = P(DATA, *([None] * (array.ndim - 1)))
            sharding = NamedSharding(self.mesh, spec)
            out[name] = jax.make_array_from_callback(array.shape, sharding,
                                                     lambda index, a=array: a[index])
        return out


# ------------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class BaseModel:
    config: ModelConfig
    params: dict
    tokenizer: Any
    source: str = ""

    def identity(self) -> dict:
        """What a checkpoint must have been made for: the architecture and the weights."""
        if getattr(self, "_weights", None) is None:
            self._weights = weights_fingerprint(self.params)["tensors"]
        return {"name": self.config.name, "fingerprint": config_fingerprint(self.config),
                "description": describe_model(self.config), "source": self.source,
                "weights": self._weights}


@dataclasses.dataclass
class TrainResult:
    adapters: dict
    lora: LoraConfig
    progress: Progress
    history: list[dict]
    validation: list[dict]
    interrupted: bool = False
    export_dir: Path | None = None
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run
    last_checkpoint: int | None = None  # step of the newest checkpoint written or resumed from


class NonFiniteTraining(FloatingPointError):
    """The loss, gradient norm or adapters of a step are NaN or Inf; nothing of it is saved."""


class MetricsLog:
    """JSON lines (process 0 only). On resume, records past the checkpoint are dropped: every
    step's record is written before the checkpoint that includes it, so each step appears once."""

    def __init__(self, path: Path | None, resume_step: int | None):
        self.path = path
        self.records: list[dict] = []
        if path is None:
            return
        if resume_step is not None and path.is_file():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if self._keep(record, resume_step):
                    kept.append(record)
            self.records = kept
            atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n"
                                            for r in kept))
        elif path.exists():
            path.unlink()

    @staticmethod
    def _keep(record: Any, resume_step: int) -> bool:
        if not isinstance(record, dict) or record.get("event") in ("end", "error"):
            return False
        step = record.get("step", 0)
        # validation at the resume step is redone: that checkpoint was taken before it
        return step < resume_step or (step == resume_step and record.get("event") != "validation")

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=_json_default) + "\n")

    def sync(self) -> None:
        """Make the records written so far durable (before a checkpoint that includes them)."""
        if self.path is not None and self.path.exists():
            with self.path.open("a", encoding="utf-8") as f:
                os.fsync(f.fileno())


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressBar:
    """One status line on stderr: what runs, a bar, done/total, elapsed and time left, and the
    caller's text (loss, tokens/s). Redrawn in place on a terminal; elsewhere one line every 10 s."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and jax.process_index() == 0
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.start: float | None = None
        self.start_done = 0

    def update(self, text: str, done: int, total: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.start is None:  # time from the first update: compilation is not in the rate
            self.start, self.start_done = now, done
        if not force and now - self.last < (0.2 if self.tty else 10.0):
            return
        self.last = now
        width = 24
        filled = int(width * done / max(total, 1))
        rate = (done - self.start_done) / max(now - self.start, 1e-9)
        left = f" ~{_duration((total - done) / rate)} left" if rate > 0 and done < total else ""
        line = (f"[{'=' * filled}{'.' * (width - filled)}] {done}/{total} "
                f"{_duration(now - self.start)}{left} {text}")
        if self.tty:
            sys.stderr.write("\r" + line[:160].ljust(160))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.start is not None:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self.start = None
        self.last = 0.0


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM ask the run to stop after the current step, with a checkpoint;
    a second one stops at once. Installed only in the main thread (elsewhere: no-op)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None:
            self.__exit__()
            raise KeyboardInterrupt(f"second {name}: stopped at once")
        self.requested = name
        os.write(2, f"\n{name}: stopping after the current step and saving a checkpoint "
                    f"(send it again to stop at once)\n".encode())

    def __enter__(self) -> "StopSignals":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


def prepare_examples(config: TrainConfig, base: BaseModel,
                     samples: Mapping[str, Sequence[Mapping[str, Any]]], split: str):
    eos = _eos_id(base)
    examples, report = data_lib.tokenize_samples(
        samples, base.tokenizer, agents=config.agents, eos_id=eos, max_len=config.max_len,
        overlong=config.overlong, view=config.view if split == "train" else "agent",
        seed=config.seed)
    data_lib.check_token_range(examples, base.config.vocab_size)
    message = report.summary(split)
    if message:
        _say("warning: " + message)
    return examples, report


def _eos_id(base: BaseModel) -> int:
    ids = tuple(getattr(base.tokenizer, "eos_token_ids", ())) or base.config.eos_token_ids
    if not ids:
        raise data_lib.DataError("the tokenizer and the model config name no EOS token; the loss "
                                 "needs one after every output")
    return int(ids[0])


def validation_subset(examples: Sequence[data_lib.Example], limit: int | None) -> list[int]:
    """Indices of at most ``limit`` examples, taken in turn from each role (so every role is
    validated), in their order; all of them when ``limit`` is None."""
    if limit is None or limit >= len(examples):
        return list(range(len(examples)))
    per_agent: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        per_agent.setdefault(e.agent, []).append(i)
    queues = [iter(v) for _, v in sorted(per_agent.items())]
    chosen: list[int] = []
    while len(chosen) < limit and queues:
        for queue in list(queues):
            index = next(queue, None)
            if index is None:
                queues.remove(queue)
            elif len(chosen) < limit:
                chosen.append(index)
    return sorted(chosen)


def check_fresh_folder(out_dir: Path, overwrite: bool) -> None:
    """A new run must not mix its results with another run's: refuse (or with ``overwrite``,
    delete) earlier results in ``out_dir``. Call with the run folder locked."""
    from train.checkpoint import remove_run_outputs

    found = [name for name in RUN_OUTPUTS if (out_dir / name).exists()
             and not ((out_dir / name).is_dir() and not any((out_dir / name).iterdir()))]
    if not found:
        return
    if not overwrite:
        raise ValueError(f"{out_dir} already holds the results of a run ({', '.join(found)}): "
                         "pass --resume to continue that run, --overwrite to start afresh "
                         "(deleting them), or another --out")
    remove_run_outputs(out_dir, RUN_OUTPUTS)


def train(config: TrainConfig, base: BaseModel, train_samples, valid_samples=None,
          run: RunOptions = RunOptions()) -> TrainResult:
    """Train every agent's adapter on role samples ``{role: [sample]}`` and export them.

    Returns the final adapters; writes checkpoints, ``metrics.jsonl``, ``loss.png`` and the
    exported adapters under ``run.out_dir`` when given (locked against a second writer).
    """
    from contextlib import nullcontext

    from train.checkpoint import RunLock

    out_dir = Path(run.out_dir) if run.out_dir is not None else None
    is_main = jax.process_index() == 0
    lock = (RunLock(out_dir, str(run.metadata.get("command", "")))
            if out_dir is not None and is_main else nullcontext())
    with lock, StopSignals(run.handle_signals) as stop:
        return _train(config, base, train_samples, valid_samples, run, out_dir, stop)


def _train(config: TrainConfig, base: BaseModel, train_samples, valid_samples, run: RunOptions,
           out_dir: Path | None, stop: StopSignals) -> TrainResult:
    lora = config.lora
    is_main = jax.process_index() == 0
    if out_dir is not None and is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not run.resume:
            check_fresh_folder(out_dir, run.overwrite)

    if config.view == "auto":
        view, reason = data_lib.auto_view(train_samples, config.agents)
        _say(f"view: {view} ({reason})")
        config = dataclasses.replace(config, view=view)
    train_examples, train_report = prepare_examples(config, base, train_samples, "train")
    valid_examples, valid_report = (prepare_examples(config, base, valid_samples, "valid")
                                    if valid_samples else ([], None))
    if not train_examples:
        raise data_lib.DataError("no training samples" + (
            f" left after dropping {train_report.total} longer than --max-len {config.max_len}"
            if train_report.total else ": the dataset is empty"))
    phases = phases_for(config)
    for phase in phases:
        if not any(e.agent in phase.agents for e in train_examples):
            raise data_lib.DataError(f"phase {phase.name!r} has no training samples (agents "
                                     f"{[config.agents[a] for a in phase.agents]})")

    placement = Placement(run.mesh_data, run.mesh_model)
    if config.batch_size % placement.data_size:
        raise ValueError(f"batch size {config.batch_size} must be a multiple of the data-parallel "
                         f"size {placement.data_size}")
    buckets = data_lib.bucket_lengths(config.max_len, config.bucket_multiple, config.bucket_ratio)
    window = data_lib.target_window(train_examples + valid_examples, config.max_len)
    eval_rows = run.eval_batch_size or config.batch_size
    if eval_rows % placement.data_size:
        raise ValueError(f"eval batch size {eval_rows} must be a multiple of the data-parallel "
                         f"size {placement.data_size}")

    params = placement.params(jax.tree.map(lambda x: x.astype(config.dtype), base.params),
                              base.config)
    adapters = _init_adapters(jax.random.key(config.seed), base.config, lora)
    assert count_parameters(adapters) == expected_parameter_count(base.config, lora)
    adapters = placement.replicate(adapters)
    fns = step_functions(base.config, config, placement.replicated)

    identity = identity_record(base.identity(), dataclasses.asdict(lora) | {
        "targets": list(lora.targets), "agents": list(lora.agents)}, config.to_dict(),
        data_lib.data_fingerprint(train_examples))
    checkpointer = (Checkpointer(out_dir / "checkpoints", keep=run.keep_checkpoints)
                    if out_dir is not None else None)

    progress = Progress()
    resumed = None  # (step, state, progress) of the checkpoint resumed from
    if run.resume:
        if checkpointer is None:
            raise ValueError("--resume needs an output folder")
        template = {"adapters": adapters,
                    "opt_state": placement.replicate(fns.optimizer.init(adapters))}
        resumed = checkpointer.restore_latest(template, identity, _say)
        if resumed is None:
            _say(f"no checkpoint in {checkpointer.directory}; starting from scratch")
    resume_step = resumed[0] if resumed is not None else None
    metrics = MetricsLog(out_dir / "metrics.jsonl" if out_dir is not None and is_main else None,
                         resume_step)
    if resume_step is None:
        metrics.write({"event": "start", "step": 0, "train": config.to_dict(),
                       "base_model": base.identity(), "adapter_parameters":
                       count_parameters(adapters), "devices": jax.device_count(),
                       "mesh": dict(placement.mesh.shape), "command": run.metadata.get("command"),
                       "data": {"train": data_lib.describe(train_examples, config.agents),
                                "valid": data_lib.describe(valid_examples, config.agents),
                                "truncation": {"train": train_report.to_dict(),
                                               "valid": valid_report.to_dict()
                                               if valid_report else None}}})
    _say(f"training {config.variant} adapters (rank {config.rank}, targets "
         f"{','.join(lora.targets)}, {config.view} view) on {len(train_examples)} samples "
         f"({len(valid_examples)} valid) of {base.config.name}; "
         f"{count_parameters(adapters):,} adapter parameters; {jax.device_count()} device(s)")

    bar = ProgressBar(run.progress)
    history: list[dict] = [r for r in metrics.records if r.get("event") == "step"]
    validation: list[dict] = [r for r in metrics.records if r.get("event") == "validation"]
    state = _RunState(checkpointer, metrics, history, bar, identity,
                      last_checkpoint=resume_step)
    interrupted = False
    speed = _Speed()

    for phase_index, phase in enumerate(phases):
        if resumed is not None and phase_index < resumed[2].phase:
            continue
        examples = [e for e in train_examples if e.agent in phase.agents]
        batches_per_epoch = math.ceil(len(examples) / config.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
        if config.max_steps is not None:
            steps_per_epoch = min(steps_per_epoch, config.max_steps)
        schedule = lr_schedule(config, steps_per_epoch * config.epochs)
        mask = placement.replicate(update_mask(lora, phase))
        if resumed is not None and phase_index == resumed[2].phase:
            adapters, opt_state = resumed[1]["adapters"], resumed[1]["opt_state"]
            progress = resumed[2]
            _say(f"resumed from step {progress.global_step} (phase {phase.name}, epoch "
                 f"{min(progress.epoch + 1, config.epochs)}, step {progress.step_in_epoch} of "
                 "the epoch)")
        else:
            opt_state = placement.replicate(fns.optimizer.init(adapters))
            progress = dataclasses.replace(progress, phase=phase_index, epoch=0, step_in_epoch=0)
        valid_cap = run.valid_samples
        if valid_cap is None and valid_examples:
            trained = min(len(examples), steps_per_epoch * config.batch_size * config.grad_accum)
            valid_cap = max(eval_rows, math.ceil(trained / 2))
        valid_indices = validation_subset(valid_examples, valid_cap)

        while progress.epoch < config.epochs and not interrupted:
            order = data_lib.epoch_order(examples, batch_size=config.batch_size, buckets=buckets,
                                         seed=config.seed, phase=phase_index, epoch=progress.epoch)
            steps = [order[i:i + config.grad_accum]
                     for i in range(0, len(order), config.grad_accum)][:steps_per_epoch]
            label = (f"{phase.name} ({phase_index + 1}/{len(phases)}) epoch "
                     f"{progress.epoch + 1}/{config.epochs}")
            last_of_run = (phase_index == len(phases) - 1 and progress.epoch + 1 == config.epochs)
            for step_index in range(progress.step_in_epoch, len(steps)):
                if stop.requested:
                    break
                acc = None
                loss_sum = count = 0.0
                tokens = padded = 0
                for indices in steps[step_index]:
                    batch = data_lib.make_batch(examples, indices, batch_size=config.batch_size,
                                                buckets=buckets, window=window)
                    tokens += batch.num_tokens
                    padded += batch.tokens.size
                    device_batch = placement.batch(batch)
                    if acc is None:
                        acc, part_loss, part_count = fns.gradients(adapters, params, device_batch)
                    else:
                        acc, part_loss, part_count = fns.accumulate(acc, adapters, params,
                                                                    device_batch)
                    loss_sum, count = loss_sum + part_loss, count + part_count
                lr = float(schedule(progress.epoch * steps_per_epoch + step_index))
                adapters, opt_state, grad_norm, finite = fns.apply(adapters, opt_state, acc, count,
                                                                   np.float32(lr), mask)
                progress = dataclasses.replace(progress, global_step=progress.global_step + 1,
                                               step_in_epoch=step_index + 1)
                failpoint("train.step")
                state.flush(speed)  # the previous step's record, now that this one is queued
                state.pending = {"event": "step", "step": progress.global_step,
                                 "phase": phase.name, "epoch": progress.epoch + 1, "lr": lr,
                                 "tokens": tokens, "padded_tokens": padded,
                                 "_done": step_index + 1, "_total": len(steps), "_label": label,
                                 "_stats": (loss_sum, count, grad_norm, finite)}
                epoch_done = step_index + 1 == len(steps)
                if epoch_done or progress.global_step % run.save_every == 0 or stop.requested:
                    state.save(progress, adapters, opt_state, speed)
                if (run.stop_after is not None and progress.global_step >= run.stop_after
                        and not (epoch_done and last_of_run)):
                    interrupted = True
                    break
            state.flush(speed)
            if stop.requested and not interrupted:
                if state.last_checkpoint != progress.global_step and progress.global_step > 0:
                    state.save(progress, adapters, opt_state, speed)
                interrupted = True
            if interrupted:
                break
            bar.close()
            # every step of the epoch is done (and checkpointed): validate
            result = _validate(fns, adapters, params, placement, valid_examples, valid_indices,
                               eval_rows, buckets, window, config, progress, phase, run, stop,
                               speed)
            if stop.requested:
                interrupted = True
                break
            if result is not None:
                metrics.write(result)
                validation.append(result)
                _say(_validation_line(result))
            progress = dataclasses.replace(progress, epoch=progress.epoch + 1, step_in_epoch=0,
                                           finished=last_of_run)
        if interrupted:
            break
    bar.close()

    if checkpointer is not None:
        checkpointer.close()
    adapters = jax.device_get(adapters)
    export_dir = None
    if not interrupted:
        if is_main and (run.export_dir is not None or out_dir is not None):
            export_dir = Path(run.export_dir) if run.export_dir is not None else out_dir / "adapters"
            save_adapters(export_dir, adapters, lora, base.config, dtype=run.export_dtype,
                          base_params=base.params,
                          metadata={"variant": config.variant, "train": config.to_dict(),
                                    "steps": progress.global_step, **dict(run.metadata),
                                    "validation": validation[-1] if validation else None})
            _say(f"adapters exported to {export_dir}")
        if is_main and out_dir is not None and run.plot:
            plot_losses(history, validation, out_dir / "loss.png", title=
                        f"{base.config.name}: {config.variant} adapters (rank {config.rank})")
        metrics.write({"event": "end", "step": progress.global_step,
                       "final_validation": validation[-1] if validation else None})
    return TrainResult(adapters, lora, progress, history, validation, interrupted, export_dir,
                       stop.requested if interrupted else None, state.last_checkpoint)


class _Speed:
    """Training tokens per second in this process (for the validation estimate)."""

    def __init__(self):
        self.tokens = 0
        self.seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 and self.tokens else None


class _RunState:
    """The step record waiting for its stats, and checkpoints that always follow their records."""

    def __init__(self, checkpointer, metrics, history, bar, identity, last_checkpoint):
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.history = history
        self.bar = bar
        self.identity = identity
        self.last_checkpoint = last_checkpoint
        self.pending: dict | None = None
        self.clock = time.perf_counter()
        self.first = True

    def flush(self, speed: _Speed) -> None:
        """Fetch the pending step's stats (the device has moved on by now), check them, log."""
        record, self.pending = self.pending, None
        if record is None:
            return
        loss_sum, count, grad_norm, finite = jax.device_get(record.pop("_stats"))
        done, total, label = record.pop("_done"), record.pop("_total"), record.pop("_label")
        now = time.perf_counter()
        elapsed = max(now - self.clock, 1e-9)
        self.clock = now
        loss = float(loss_sum) / max(float(count), 1.0)
        record.update(loss=loss, targets=int(count), grad_norm=float(grad_norm),
                      step_seconds=elapsed, tokens_per_s=record["tokens"] / elapsed)
        if not (math.isfinite(loss) and math.isfinite(float(grad_norm)) and bool(finite)):
            where = (f"the newest checkpoint (step {self.last_checkpoint}) holds finite adapters"
                     if self.last_checkpoint is not None else "no checkpoint was written")
            message = (f"step {record['step']} ({label}): loss {loss}, gradient norm "
                       f"{float(grad_norm)}, adapters {'finite' if finite else 'NOT finite'}; "
                       f"training stopped before saving or exporting this step ({where}). Try a "
                       "lower --lr or --clip-norm, --dtype float32 or bfloat16 instead of "
                       "float16, and check the base weights and data")
            self.metrics.write({"event": "error", "step": record["step"], "message": message})
            raise NonFiniteTraining(message)
        if not self.first:  # the first step's time is mostly compilation
            speed.add(record["padded_tokens"], elapsed)
        self.first = False
        self.history.append(record)
        self.metrics.write(record)
        failpoint("train.record")
        self.bar.update(f"{label} loss {loss:.4f} {record['tokens_per_s']:,.0f} tok/s", done,
                        total, force=done == total)

    def save(self, progress: Progress, adapters, opt_state, speed: _Speed) -> None:
        """Checkpoint the state after ``progress`` (its step's record first), if there is a
        checkpoint folder."""
        self.flush(speed)
        if self.checkpointer is None:
            return
        self.metrics.sync()
        self.checkpointer.save(progress.global_step, {"adapters": adapters,
                                                      "opt_state": opt_state},
                               progress, self.identity)
        self.last_checkpoint = progress.global_step


def per_role_totals(results, examples, num_agents: int):
    """Sum per-row (nll, target count, all-correct) results over each example's role.

    ``results`` yields (example indices of the rows, (nll [B], count [B], ok [B])).
    Returns nll, targets, correct, samples: float arrays [num_agents].
    """
    nll, targets, correct, samples = (np.zeros(num_agents) for _ in range(4))
    for indices, out in results:
        row_nll, row_count, row_ok = jax.device_get(out)
        for row, i in enumerate(indices):
            agent = examples[i].agent
            nll[agent] += row_nll[row]
            targets[agent] += row_count[row]
            correct[agent] += bool(row_ok[row])
            samples[agent] += 1
    return nll, targets, correct, samples


class _Stopped(Exception):
    pass


def _validate(fns: StepFunctions, adapters, params, placement: Placement, valid_examples,
              valid_indices, eval_rows, buckets, window, config: TrainConfig,
              progress: Progress, phase: Phase, run: RunOptions, stop: StopSignals,
              speed: _Speed) -> dict | None:
    """Validation loss and greedy exact match per role (teacher-forced: every output token and
    EOS is the argmax given the gold prefix, which is what greedy decoding reproduces), over
    ``valid_indices``; says beforehand how long it should take, and shows progress."""
    if not valid_indices:
        return None
    subset = [valid_examples[i] for i in valid_indices]
    batches = data_lib.evaluation_batches(subset, batch_size=eval_rows, buckets=buckets,
                                          window=window)
    tokens = sum(b.tokens.size for _, b in batches)
    capped = ""
    if len(subset) < len(valid_examples):
        capped = f" of {len(valid_examples)} (" + (
            "at most half as many as the epoch trains on; --valid-samples N to choose)"
            if run.valid_samples is None else f"--valid-samples {run.valid_samples})")
    # a forward pass is about a third of a training step's work (forward + backward)
    estimate = (f"; about {_duration(tokens / (3 * speed.tokens_per_s))} at this run's speed"
                if speed.tokens_per_s else "")
    _say(f"validating {len(subset)} samples{capped}: {len(batches)} batches, {tokens:,} "
         f"padded tokens{estimate}")
    bar = ProgressBar(run.progress)

    def results():
        for done, (indices, batch) in enumerate(batches, start=1):
            if stop.requested:
                raise _Stopped
            failpoint("validation.batch")
            out = jax.device_get(fns.evaluate(adapters, params, placement.batch(batch)))
            bar.update("validation", done, len(batches), force=done == len(batches))
            yield indices, out

    agents = config.agents
    try:
        nll, targets, correct, samples = per_role_totals(results(), subset, len(agents))
    except _Stopped:
        bar.close()
        return None
    bar.close()
    have = samples > 0
    return {"event": "validation", "step": progress.global_step, "phase": phase.name,
            "epoch": progress.epoch + 1,
            "loss": float(nll[have].sum() / max(targets[have].sum(), 1.0)),
            "loss_per_role": {a: float(nll[i] / targets[i]) for i, a in enumerate(agents)
                              if have[i]},
            "exact_match_per_role": {a: float(correct[i] / samples[i])
                                     for i, a in enumerate(agents) if have[i]},
            "samples_per_role": {a: int(samples[i]) for i, a in enumerate(agents)},
            "samples_available": len(valid_examples)}


def _validation_line(result: dict) -> str:
    em = ", ".join(f"{a} {v:.1%}" for a, v in result["exact_match_per_role"].items())
    return (f"validation after epoch {result['epoch']} ({result['phase']}): loss "
            f"{result['loss']:.4f}; greedy exact match {em}")


def plot_losses(history: Sequence[dict], validation: Sequence[dict], path: Path,
                title: str = "") -> None:
    """Training loss per step (and its running mean) with validation loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if history:
        steps = np.asarray([r["step"] for r in history])
        losses = np.asarray([r["loss"] for r in history])
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (step)")
        window = max(1, len(losses) // 50)
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"train (mean of {window})")
    if validation:
        ax.plot([r["step"] for r in validation], [r["loss"] for r in validation], "o-",
                color="tab:red", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
