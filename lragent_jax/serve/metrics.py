"""Server counters, gauges and histograms, rendered in the Prometheus text format (version 0.0.4).

Thread-safe: the engine thread and the HTTP event loop both update them.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

PREFIX = "lragent"

# seconds; a CPU tiny model answers in milliseconds, an 8B model at 16k context in seconds
TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# a client's round trip between two turns: milliseconds, and what the engine's wait is set from
RETURN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5,
                  1.0, 2.5)


COMPILE_EVENT = "/jax/core/compile/"  # JAX's tracing, lowering and compiling durations
_compiled = {"seconds": 0.0, "listening": False}


def _on_duration(name: str, duration: float, **_) -> None:
    if name.startswith(COMPILE_EVENT):
        _compiled["seconds"] += duration


def compile_seconds() -> float:
    """Seconds this process has spent compiling since the first call (a listener is registered
    once, on the first call)."""
    if not _compiled["listening"]:
        import jax

        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _compiled["listening"] = True
    return _compiled["seconds"]


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
               for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped)) + "}"


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Family:
    def __init__(self, name: str, help_text: str, kind: str, labels: Sequence[str]):
        self.name, self.help, self.kind, self.labels = f"{PREFIX}_{name}", help_text, kind, \
            tuple(labels)

    def _key(self, labels: dict | None) -> tuple:
        labels = labels or {}
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}; got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    def __init__(self, name, help_text, labels=()):
        super().__init__(name, help_text, "counter", labels)
        self.values: dict[tuple, float] = {}

    def inc(self, amount: float = 1, **labels) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0) + amount

    def get(self, **labels) -> float:
        return self.values.get(self._key(labels), 0)

    def render(self) -> list[str]:
        lines = self.header()
        if not self.values and not self.labels:
            lines.append(f"{self.name} 0")
        for key, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.labels, key)} {_number(value)}")
        return lines


class Gauge(_Family):
    """A value read when rendered."""

    def __init__(self, name, help_text, read: Callable[[], float]):
        super().__init__(name, help_text, "gauge", ())
        self.read = read

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_number(self.read())}"]


class Histogram(_Family):
    def __init__(self, name, help_text, buckets=TIME_BUCKETS):
        super().__init__(name, help_text, "histogram", ())
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines, running = self.header(), 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            running += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        lines += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    """Everything ``/metrics`` shows. ``rows_in_use`` / ``rows_busy`` / ``waiting`` are read
    from the engine when rendered."""

    def __init__(self, *, rows: int, rows_in_use: Callable[[], int], rows_busy: Callable[[], int],
                 waiting: Callable[[], int]):
        self._lock = threading.Lock()
        self.requests = Counter("requests_total", "HTTP requests by endpoint and status code.",
                                ("endpoint", "status"))
        self.finished = Counter("generations_total", "Generations by model and finish reason "
                                "(stop, length, cancelled, error).", ("model", "reason"))
        self.prompt_tokens = Counter("prompt_tokens_total", "Prompt tokens of generations.",
                                     ("model",))
        self.cached_tokens = Counter("cached_prompt_tokens_total",
                                     "Prompt tokens reused from the cache (not prefilled).",
                                     ("model",))
        self.prefilled_tokens = Counter("prefilled_tokens_total",
                                        "Tokens prefilled (prompt tokens not in the cache, and "
                                        "the last token of each generated block).", ("model",))
        self.completion_tokens = Counter("completion_tokens_total",
                                         "Tokens returned in completions.", ("model",))
        self.cache_hits = Counter("cache_hits_total",
                                  "Generations whose prompt reused at least one cached token.",
                                  ("model",))
        self.divergences = Counter("prefix_divergences_total",
                                   "Prompts that diverged from the row they were matched with: "
                                   "the row was cut back to the common prefix.")
        self.evictions = Counter("evictions_total",
                                 "Trajectories given up for a new one because every row was "
                                 "in use (least recently used first).")
        self.evicted_tokens = Counter("evicted_tokens_total", "Tokens of evicted trajectories.")
        self.engine_calls = Counter("engine_calls_total", "Jitted turn calls run by the engine.")
        self.engine_seconds = Counter("engine_call_seconds_total",
                                      "Seconds spent in jitted turn calls.")
        self.prefill_slots = Counter(
            "engine_prefill_slots_total", "Row x position slots the calls' prefills computed, "
            "padding included (lragent_prefilled_tokens_total over this: how well the calls "
            "packed their prefills).")
        self.calls_by_shape = Counter(
            "engine_calls_by_shape_total", "Jitted turn calls by the rows in the call and its "
            "padded prefill length (a call prefills every row over its longest chunk).",
            ("rows", "chunk_bucket"))
        self.seconds_by_shape = Counter(
            "engine_call_seconds_by_shape_total", "Seconds in jitted turn calls, by the same "
            "shape.", ("rows", "chunk_bucket"))
        self.gather_seconds = Counter(
            "engine_gather_seconds_total", "Seconds the engine held its next call for the clients "
            "the last call answered (see --batch-wait-ms).")
        self.gather_short = Counter(
            "engine_gather_short_total", "Calls that started at the end of that wait with fewer "
            "requests than the last call answered (a returning client missed the call).")
        self.client_return = Histogram(
            "client_return_seconds", "From an answer on a trajectory to the next request of that "
            "trajectory reaching the engine (pinned requests): the client's round trip.",
            buckets=RETURN_BUCKETS)
        self.ttft = Histogram("time_to_first_token_seconds",
                              "From a request reaching the engine to its first token.")
        self.latency = Histogram("request_duration_seconds",
                                 "From a request reaching the engine to its last token.")
        self._gauges = [
            Gauge("rows", "Rows (trajectories the server can hold at once).", lambda: rows),
            Gauge("rows_in_use", "Rows holding a trajectory.", rows_in_use),
            Gauge("rows_busy", "Rows with a request running on them.", rows_busy),
            Gauge("requests_waiting", "Requests waiting for a row.", waiting),
            Gauge("compile_seconds", "Seconds spent compiling turns of new shapes (the first "
                  "requests of each shape wait for it).", compile_seconds),
        ]
        compile_seconds()  # listen from now on

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def render(self) -> str:
        with self._lock:
            families = [self.requests, self.finished, self.prompt_tokens, self.cached_tokens,
                        self.prefilled_tokens, self.completion_tokens, self.cache_hits,
                        self.divergences, self.evictions, self.evicted_tokens,
                        self.engine_calls, self.engine_seconds, self.prefill_slots,
                        self.calls_by_shape,
                        self.seconds_by_shape, self.gather_seconds,
                        self.gather_short, self.client_return, self.ttft, self.latency]
            lines = [line for f in families for line in f.render()]
        lines += [line for g in self._gauges for line in g.render()]
        return "\n".join(lines) + "\n"
