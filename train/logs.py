"""What a run reports: ``metrics.jsonl`` (``MetricsLog``), the status line on stderr
(``ProgressBar``, ``say``), the validation line, and the loss curve (``plot_losses``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lragent_jax.runtime import format_seconds

from lragent_jax.loading.integrity import atomic_write_text


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
        left = f" ~{format_seconds((total - done) / rate)} left" if rate > 0 and done < total else ""
        line = (f"[{'=' * filled}{'.' * (width - filled)}] {done}/{total} "
                f"{format_seconds(now - self.start)}{left} {text}")
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


def say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


class Speed:
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


def validation_line(result: dict) -> str:
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
