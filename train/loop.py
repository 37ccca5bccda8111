"""Training all role adapters of one base model: the run, its phases, epochs and steps.

The pieces live beside this file: ``train.config`` (what a run is: ``TrainConfig``, ``RunOptions``,
the variants' phases), ``train.loss`` (the objective), ``train.step`` (optimizer, schedule and the
compiled step), ``train.placement`` (the mesh), ``train.logs`` (metrics, progress, the loss plot),
``train.data`` (samples -> batches) and ``train.checkpoint``.

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
import math
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lragent_jax.adapters_io import (config_fingerprint, describe_model, save_adapters,
                                     weights_fingerprint)
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.loading.integrity import failpoint
from lragent_jax.lora import count_parameters, expected_parameter_count, init_adapters
from lragent_jax.runtime import format_seconds
from train import data as data_lib
from train.checkpoint import Checkpointer, Progress, identity_record
from train.config import Phase, RunOptions, TrainConfig, phases_for
from train.logs import (MetricsLog, ProgressBar, Speed, plot_losses, say,
                        validation_line)
from train.loss import per_role_totals
from train.placement import Placement
from train.step import StepFunctions, lr_schedule, step_functions, update_mask

RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "loss.png", "adapters")


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
        overlong=config.overlong, data_view=config.data_view if split == "train" else "agent",
        seed=config.seed)
    data_lib.check_token_range(examples, base.config.vocab_size)
    message = report.summary(split)
    if message:
        say("warning: " + message)
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
    """The run's sections in order: check the folder, prepare the data, set up (or resume), train
    phase by phase, export."""
    if out_dir is not None and jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not run.resume:
            check_fresh_folder(out_dir, run.overwrite)
    if config.data_view == "auto":
        view, reason = data_lib.auto_view(train_samples, config.agents)
        say(f"view: {view} ({reason})")
        config = dataclasses.replace(config, data_view=view)
    data = _prepare_data(config, base, train_samples, valid_samples)
    session = _Run(config, base, run, out_dir, stop, data)
    for index, phase in enumerate(data.phases):
        if session.resumed is not None and index < session.resumed[2].phase:
            continue
        session.run_phase(index, phase)
        if session.interrupted:
            break
    return session.finish()


@dataclasses.dataclass(frozen=True)
class _Data:
    """The tokenized examples of a run and its phases."""

    train: list[data_lib.Example]
    valid: list[data_lib.Example]
    train_report: data_lib.TruncationReport
    valid_report: data_lib.TruncationReport | None
    phases: list[Phase]


def _prepare_data(config: TrainConfig, base: BaseModel, train_samples, valid_samples) -> _Data:
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
    return _Data(train_examples, valid_examples, train_report, valid_report, phases)


@dataclasses.dataclass(frozen=True)
class _PhasePlan:
    """What every epoch of one phase uses."""

    index: int
    phase: Phase
    examples: list[data_lib.Example]
    steps_per_epoch: int
    schedule: Any  # step -> learning rate
    mask: dict
    valid_indices: list[int]


class _Run:
    """One run's state between its sections: placement, parameters, adapters and optimizer state,
    progress, logs, and whether it was interrupted."""

    def __init__(self, config: TrainConfig, base: BaseModel, run: RunOptions,
                 out_dir: Path | None, stop: StopSignals, data: _Data):
        self.config, self.base, self.run, self.out_dir = config, base, run, out_dir
        self.stop, self.data, self.lora = stop, data, config.lora
        self.is_main = jax.process_index() == 0
        placement = self.placement = Placement(run.mesh_data, run.mesh_model)
        if config.batch_size % placement.data_size:
            raise ValueError(f"batch size {config.batch_size} must be a multiple of the "
                             f"data-parallel size {placement.data_size}")
        self.buckets = data_lib.bucket_lengths(config.max_len, config.bucket_multiple,
                                               config.bucket_ratio)
        self.window = data_lib.target_window(data.train + data.valid, config.max_len)
        self.eval_rows = run.eval_batch_size or config.batch_size
        if self.eval_rows % placement.data_size:
            raise ValueError(f"eval batch size {self.eval_rows} must be a multiple of the "
                             f"data-parallel size {placement.data_size}")
        self.params = placement.params(
            jax.tree.map(lambda x: x.astype(config.dtype), base.params), base.config)
        adapters = init_adapters(jax.random.key(config.seed), base.config, self.lora)
        assert count_parameters(adapters) == expected_parameter_count(base.config, self.lora)
        self.adapters = placement.replicate(adapters)
        self.opt_state = None
        self.fns = step_functions(base.config, config, placement.replicated)
        self.identity = identity_record(base.identity(), dataclasses.asdict(self.lora) | {
            "targets": list(self.lora.targets), "agents": list(self.lora.agents)},
            config.to_dict(), data_lib.data_fingerprint(data.train))
        self.checkpointer = (Checkpointer(out_dir / "checkpoints", keep=run.keep_checkpoints)
                             if out_dir is not None else None)
        self.progress = Progress()
        self.resumed = self._restore()  # (step, state, progress) of the checkpoint resumed from
        self._open_log()
        self.interrupted = False
        self.speed = Speed()

    def _restore(self):
        if not self.run.resume:
            return None
        if self.checkpointer is None:
            raise ValueError("--resume needs an output folder")
        template = {"adapters": self.adapters,
                    "opt_state": self.placement.replicate(self.fns.optimizer.init(self.adapters))}
        resumed = self.checkpointer.restore_latest(template, self.identity, say)
        if resumed is None:
            say(f"no checkpoint in {self.checkpointer.directory}; starting from scratch")
        return resumed

    def _open_log(self) -> None:
        """The metrics log (trimmed to the resumed checkpoint), the start record, the progress
        bar, and the records the run has so far."""
        config, base, data = self.config, self.base, self.data
        resume_step = self.resumed[0] if self.resumed is not None else None
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl"
                                  if self.out_dir is not None and self.is_main else None,
                                  resume_step)
        parameters = count_parameters(self.adapters)
        if resume_step is None:
            self.metrics.write({
                "event": "start", "step": 0, "train": config.to_dict(),
                "base_model": base.identity(), "adapter_parameters": parameters,
                "devices": jax.device_count(), "mesh": dict(self.placement.mesh.shape),
                "command": self.run.metadata.get("command"),
                "data": {"train": data_lib.describe(data.train, config.agents),
                         "valid": data_lib.describe(data.valid, config.agents),
                         "truncation": {"train": data.train_report.to_dict(),
                                        "valid": data.valid_report.to_dict()
                                        if data.valid_report else None}}})
        say(f"training {config.variant} adapters (rank {config.rank}, targets "
            f"{','.join(self.lora.targets)}, {config.data_view} view) on {len(data.train)} "
            f"samples ({len(data.valid)} valid) of {base.config.name}; {parameters:,} adapter "
            f"parameters; {jax.device_count()} device(s)")
        self.bar = ProgressBar(self.run.progress)
        self.history = [r for r in self.metrics.records if r.get("event") == "step"]
        self.validation = [r for r in self.metrics.records if r.get("event") == "validation"]
        self.state = _RunState(self.checkpointer, self.metrics, self.history, self.bar,
                               self.identity, last_checkpoint=resume_step)

    def run_phase(self, index: int, phase: Phase) -> None:
        """Every remaining epoch of one phase (from the resumed checkpoint if it is this one's)."""
        config = self.config
        examples = [e for e in self.data.train if e.agent in phase.agents]
        batches_per_epoch = math.ceil(len(examples) / config.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
        if config.max_steps is not None:
            steps_per_epoch = min(steps_per_epoch, config.max_steps)
        schedule = lr_schedule(config, steps_per_epoch * config.epochs)
        mask = self.placement.replicate(update_mask(self.lora, phase))
        if self.resumed is not None and index == self.resumed[2].phase:
            self.adapters = self.resumed[1]["adapters"]
            self.opt_state = self.resumed[1]["opt_state"]
            self.progress = progress = self.resumed[2]
            say(f"resumed from step {progress.global_step} (phase {phase.name}, epoch "
                f"{min(progress.epoch + 1, config.epochs)}, step {progress.step_in_epoch} of "
                "the epoch)")
        else:
            self.opt_state = self.placement.replicate(self.fns.optimizer.init(self.adapters))
            self.progress = dataclasses.replace(self.progress, phase=index, epoch=0,
                                                step_in_epoch=0)
        valid_cap = self.run.valid_samples
        if valid_cap is None and self.data.valid:
            trained = min(len(examples), steps_per_epoch * config.batch_size * config.grad_accum)
            valid_cap = max(self.eval_rows, math.ceil(trained / 2))
        plan = _PhasePlan(index, phase, examples, steps_per_epoch, schedule, mask,
                          validation_subset(self.data.valid, valid_cap))
        while self.progress.epoch < config.epochs and not self.interrupted:
            self._run_epoch(plan)

    def _run_epoch(self, plan: _PhasePlan) -> None:
        """The epoch's remaining steps, checkpointed, then its validation (unless interrupted)."""
        config, run, state = self.config, self.run, self.state
        order = data_lib.epoch_order(plan.examples, batch_size=config.batch_size,
                                     buckets=self.buckets, seed=config.seed, phase=plan.index,
                                     epoch=self.progress.epoch)
        steps = [order[i:i + config.grad_accum]
                 for i in range(0, len(order), config.grad_accum)][:plan.steps_per_epoch]
        label = (f"{plan.phase.name} ({plan.index + 1}/{len(self.data.phases)}) epoch "
                 f"{self.progress.epoch + 1}/{config.epochs}")
        last_of_run = (plan.index == len(self.data.phases) - 1
                       and self.progress.epoch + 1 == config.epochs)
        for step_index in range(self.progress.step_in_epoch, len(steps)):
            if self.stop.requested:
                break
            self._step(plan, steps[step_index], step_index, len(steps), label)
            epoch_done = step_index + 1 == len(steps)
            if (epoch_done or self.progress.global_step % run.save_every == 0
                    or self.stop.requested):
                state.save(self.progress, self.adapters, self.opt_state, self.speed)
            if (run.stop_after is not None and self.progress.global_step >= run.stop_after
                    and not (epoch_done and last_of_run)):
                self.interrupted = True
                break
        state.flush(self.speed)
        if self.stop.requested and not self.interrupted:
            if (state.last_checkpoint != self.progress.global_step
                    and self.progress.global_step > 0):
                state.save(self.progress, self.adapters, self.opt_state, self.speed)
            self.interrupted = True
        if self.interrupted:
            return
        self.bar.close()
        # every step of the epoch is done (and checkpointed): validate
        result = _validate(self.fns, self.adapters, self.params, self.placement, self.data.valid,
                           plan.valid_indices, self.eval_rows, self.buckets, self.window, config,
                           self.progress, plan.phase, run, self.stop, self.speed)
        if self.stop.requested:
            self.interrupted = True
            return
        if result is not None:
            self.metrics.write(result)
            self.validation.append(result)
            say(validation_line(result))
        self.progress = dataclasses.replace(self.progress, epoch=self.progress.epoch + 1,
                                            step_in_epoch=0, finished=last_of_run)

    def _step(self, plan: _PhasePlan, micro_batches: Sequence[Sequence[int]], step_index: int,
              total: int, label: str) -> None:
        """One optimizer step over ``micro_batches``; its record waits for the next step (the
        device runs ahead while the host prepares it)."""
        config, fns = self.config, self.fns
        acc = None
        loss_sum = count = 0.0
        tokens = padded = 0
        for indices in micro_batches:
            batch = data_lib.make_batch(plan.examples, indices, batch_size=config.batch_size,
                                        buckets=self.buckets, window=self.window)
            tokens += batch.num_tokens
            padded += batch.tokens.size
            device_batch = self.placement.batch(batch)
            if acc is None:
                acc, part_loss, part_count = fns.gradients(self.adapters, self.params,
                                                           device_batch)
            else:
                acc, part_loss, part_count = fns.accumulate(acc, self.adapters, self.params,
                                                            device_batch)
            loss_sum, count = loss_sum + part_loss, count + part_count
        lr = float(plan.schedule(self.progress.epoch * plan.steps_per_epoch + step_index))
        self.adapters, self.opt_state, grad_norm, finite = fns.apply(
            self.adapters, self.opt_state, acc, count, np.float32(lr), plan.mask)
        self.progress = dataclasses.replace(self.progress,
                                            global_step=self.progress.global_step + 1,
                                            step_in_epoch=step_index + 1)
        failpoint("train.step")
        self.state.flush(self.speed)  # the previous step's record, now that this one is queued
        self.state.pending = {"event": "step", "step": self.progress.global_step,
                              "phase": plan.phase.name, "epoch": self.progress.epoch + 1,
                              "lr": lr, "tokens": tokens, "padded_tokens": padded,
                              "_done": step_index + 1, "_total": total, "_label": label,
                              "_stats": (loss_sum, count, grad_norm, finite)}

    def finish(self) -> TrainResult:
        """Export the adapters and plot the losses (unless interrupted); the run's result."""
        config, run, out_dir = self.config, self.run, self.out_dir
        self.bar.close()
        if self.checkpointer is not None:
            self.checkpointer.close()
        adapters = jax.device_get(self.adapters)
        export_dir = None
        validation = self.validation
        if not self.interrupted:
            if self.is_main and (run.export_dir is not None or out_dir is not None):
                export_dir = (Path(run.export_dir) if run.export_dir is not None
                              else out_dir / "adapters")
                save_adapters(export_dir, adapters, self.lora, self.base.config,
                              dtype=run.export_dtype, base_params=self.base.params,
                              metadata={"variant": config.variant, "train": config.to_dict(),
                                        "steps": self.progress.global_step, **dict(run.metadata),
                                        "validation": validation[-1] if validation else None})
                say(f"adapters exported to {export_dir}")
            if self.is_main and out_dir is not None and run.plot:
                plot_losses(self.history, validation, out_dir / "loss.png", title=
                            f"{self.base.config.name}: {config.variant} adapters "
                            f"(rank {config.rank})")
            self.metrics.write({"event": "end", "step": self.progress.global_step,
                                "final_validation": validation[-1] if validation else None})
        return TrainResult(adapters, self.lora, self.progress, self.history, validation,
                           self.interrupted, export_dir,
                           self.stop.requested if self.interrupted else None,
                           self.state.last_checkpoint)


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

    def flush(self, speed: Speed) -> None:
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

    def save(self, progress: Progress, adapters, opt_state, speed: Speed) -> None:
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


class _Stopped(Exception):
    pass


def _validate(fns: StepFunctions, adapters, params, placement: Placement, valid_examples,
              valid_indices, eval_rows, buckets, window, config: TrainConfig,
              progress: Progress, phase: Phase, run: RunOptions, stop: StopSignals,
              speed: Speed) -> dict | None:
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
    estimate = (f"; about {format_seconds(tokens / (3 * speed.tokens_per_s))} at this run's speed"
                if speed.tokens_per_s else "")
    say(f"validating {len(subset)} samples{capped}: {len(batches)} batches, {tokens:,} "
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
