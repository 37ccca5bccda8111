"""Process-level runtime of the command-line tools: the persistent XLA compilation cache, compile
statistics, one progress-line style, and Ctrl-C that stops within seconds.

Compiled programs are kept on disk between runs (``$XDG_CACHE_HOME/lragent-jax/xla``, else
``~/.cache/lragent-jax/xla``), so a second run skips XLA's compile of every turn shape it has seen.
``LRAGENT_COMPILATION_CACHE`` moves the folder (a path) or turns the cache off (``off``); a command
line flag wins over the variable. A ``JAX_COMPILATION_CACHE_DIR`` the user set is left alone.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "LRAGENT_COMPILATION_CACHE"
OFF_VALUES = ("off", "0", "none", "false", "no")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lragent-jax/xla`` (default ``~/.cache/lragent-jax/xla``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lragent-jax" / "xla"


def resolve_cache_dir(flag: str | None = None) -> Path | None:
    """Where compiled programs go: ``flag`` (a path or 'off'), else ``$LRAGENT_COMPILATION_CACHE``
    (a path or 'off'), else the default folder. None: off."""
    value = flag if flag is not None else os.environ.get(CACHE_ENV)
    if value is None:
        return default_cache_dir()
    value = value.strip()
    if not value or value.lower() in OFF_VALUES:
        return None
    return Path(value).expanduser()


def enable_compilation_cache(path: str | os.PathLike | None, *,
                             min_compile_seconds: float = 0.2) -> Path | None:
    """Keep compiled programs in ``path`` (None: no persistent cache). Returns the folder in use.

    Programs that took under ``min_compile_seconds`` to compile are not written (reading them
    back would cost about as much). Safe to call again with another folder: later compilations
    use the new one. A folder that cannot be created turns the cache off with a warning.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") and path is not None:
        path = os.environ["JAX_COMPILATION_CACHE_DIR"]
    if path is not None:
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"warning: compilation cache folder {path} cannot be created ({err}); "
                  f"compiling without it (set {CACHE_ENV}=off to silence this)", file=sys.stderr)
            path = None
    compilation_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", path is not None)
    jax.config.update("jax_compilation_cache_dir", str(path) if path is not None else None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return path


def persistent_cache_active() -> bool:
    """Whether compiles may write to jax's persistent compilation cache: its settings say so, or
    an earlier compile opened a cache folder (jax keeps using it until ``reset_cache``). jax's own
    ``_cache_used`` is not asked: it is set on the first compile whenever the cache is enabled,
    which it is by default, with or without a folder."""
    import jax

    if jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir:
        return True
    try:
        from jax._src import compilation_cache
        return bool(compilation_cache._cache_initialized)
    except (ImportError, AttributeError):  # another jax: trust the settings
        return False


# ---------------------------------------------------------------------------- compile statistics

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_CACHE_MISS = "/jax/compilation_cache/cache_misses"


@dataclasses.dataclass
class CompileStats:
    """Counters of this process's compilations (XLA backend compiles, persistent-cache hits)."""

    compiles: int = 0  # XLA compilations (a persistent-cache hit counts here too, cheaply)
    compile_seconds: float = 0.0  # time in XLA compile, including cache reads
    trace_seconds: float = 0.0  # tracing and lowering to MLIR (never cached on disk)
    cache_hits: int = 0
    cache_misses: int = 0
    compiling: str | None = None  # the function being compiled right now, if any

    def snapshot(self) -> "CompileStats":
        return dataclasses.replace(self)

    def since(self, start: "CompileStats") -> dict:
        return {"compiles": self.compiles - start.compiles,
                "compile_seconds": round(self.compile_seconds - start.compile_seconds, 3),
                "trace_seconds": round(self.trace_seconds - start.trace_seconds, 3),
                "cache_hits": self.cache_hits - start.cache_hits,
                "cache_misses": self.cache_misses - start.cache_misses}


_STATS = CompileStats()
_LISTENING = False


def compile_stats() -> CompileStats:
    """The process-wide counters (listeners are installed on first call)."""
    global _LISTENING
    if not _LISTENING:
        from jax import monitoring

        def on_duration(event, seconds, **kwargs):
            if event == _BACKEND_COMPILE:
                _STATS.compiles += 1
                _STATS.compile_seconds += seconds
                _STATS.compiling = None
            elif event in (_TRACE, _LOWER):
                _STATS.trace_seconds += seconds

        def on_event(event, **kwargs):
            if event == _CACHE_HIT:
                _STATS.cache_hits += 1
            elif event == _CACHE_MISS:
                _STATS.cache_misses += 1

        def on_scalar(event, value, **kwargs):
            # the start of a backend compile is recorded as a scalar (its start time)
            if event == _BACKEND_COMPILE:
                _STATS.compiling = str(kwargs.get("fun_name") or "program")

        monitoring.register_event_duration_secs_listener(on_duration)
        monitoring.register_event_listener(on_event)
        monitoring.register_scalar_listener(on_scalar)
        _LISTENING = True
    return _STATS


# ---------------------------------------------------------------------------- progress


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """One status line on stderr, ``[=====.....] done/total label  12s, ETA 40s``, redrawn in
    place. Silent when stderr is not a terminal or when disabled (``--quiet``); results and
    headings are printed by the caller, never here. Use as a context manager, or call
    ``close()``: the line is cleared so that the next print starts clean.

    The ETA extrapolates the time per unit of work measured since the first ``update``; while a
    compilation runs, the line says so.
    """

    width = 24

    def __init__(self, label: str, total: int, *, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.label, self.total, self.done = label, max(int(total), 1), 0
        self.started = time.perf_counter()
        self.note = ""
        self._last_draw = 0.0
        self._drawn = False
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if self.enabled:
            compile_stats()
            self.draw(force=True)
            # redraws the elapsed time while the main thread sits in a long compile or call
            threading.Thread(target=self._tick, name="progress", daemon=True).start()

    def _tick(self) -> None:
        # a compilation still running at a tick is a long one: say so (short ones would flicker)
        while not self._closed.wait(1.0):
            name = _STATS.compiling
            self.draw(note=f"compiling {name}" if name else None)

    def update(self, done: int | None = None, *, advance: int = 0, note: str | None = None) -> None:
        self.done = min(self.total, self.done + advance if done is None else done)
        if note is not None:
            self.note = note
        self.draw(force=self.done >= self.total)

    def eta_seconds(self) -> float | None:
        if self.done <= 0:
            return None
        elapsed = time.perf_counter() - self.started
        return elapsed / self.done * (self.total - self.done)

    def line(self, note: str | None = None) -> str:
        filled = int(self.width * self.done / self.total)
        elapsed = time.perf_counter() - self.started
        eta = self.eta_seconds()
        timing = format_seconds(elapsed) + (f", ETA {format_seconds(eta)}"
                                            if eta is not None and self.done < self.total else "")
        text = note if note is not None else self.note
        return (f"[{'=' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{self.label}  {timing}" + (f"  {text}" if text else ""))

    def _columns(self) -> int:
        try:
            return min(160, os.get_terminal_size(self.stream.fileno()).columns - 1)
        except (OSError, ValueError, AttributeError):
            return 160

    def draw(self, *, note: str | None = None, force: bool = False) -> None:
        if not self.enabled:
            return
        with self._lock:
            now = time.perf_counter()
            if not force and now - self._last_draw < 0.2:
                return
            self._last_draw = now
            columns = self._columns()
            self.stream.write("\r" + self.line(note)[:columns].ljust(columns))
            self.stream.flush()
            self._drawn = True

    def clear(self) -> None:
        """Erase the line (it comes back at the next update), e.g. before printing a result."""
        if not self.enabled:
            return
        with self._lock:
            if self._drawn:
                self.stream.write("\r" + " " * self._columns() + "\r")
                self.stream.flush()
                self._drawn = False

    def print(self, *values, **kwargs) -> None:
        """``print`` to stdout above the progress line."""
        self.clear()
        print(*values, **kwargs, flush=True)
        self.draw(force=True)

    def close(self) -> None:
        if self.enabled:
            self._closed.set()
            self.clear()
            self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- Ctrl-C


class InterruptGuard:
    """Ctrl-C that ends the program within ``grace`` seconds even while the main thread is inside
    a long compiled call (where Python cannot raise ``KeyboardInterrupt`` until the call returns).

    The usual ``KeyboardInterrupt`` still comes first; if the main thread has not finished within
    ``grace`` seconds, ``on_timeout`` runs on a watcher thread (save what can be saved) and the
    process exits with status 130. Use as a context manager around the command's work.

    Leaving the guard after a Ctrl-C (the ``KeyboardInterrupt`` passing through it or caught inside
    it) means the command is stopping: the watcher then stays, so the grace still ends the process.
    A Ctrl-C between a compiled call's dispatch and the wait for its result leaves that call
    running, and the interpreter's exit waits for it (minutes, for a long call).
    """

    def __init__(self, on_timeout: Callable[[], None] | None = None, *, grace: float = 3.0):
        self.on_timeout, self.grace = on_timeout, grace
        self._reader = self._writer = None
        self._previous_fd = None
        self._previous_handler = None
        self._thread = None
        self._stop = threading.Event()
        self.interrupted = threading.Event()
        self._sigint_seen = False  # set in the main thread, before its KeyboardInterrupt

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only: nothing to guard
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(True)
        self._writer.setblocking(False)
        try:
            self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(),
                                                     warn_on_full_buffer=False)
        except ValueError:
            self._reader.close()
            self._writer.close()
            self._reader = self._writer = None
            return self
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        self._thread = threading.Thread(target=self._watch, name="interrupt-guard", daemon=True)
        self._thread.start()
        return self

    def _on_sigint(self, signum, frame) -> None:
        self._sigint_seen = True
        signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._reader.recv(64)
            except OSError:
                return
            if not data or self._stop.is_set():
                return
            if signal.SIGINT not in data:
                continue
            self.interrupted.set()
            if self._stop.wait(self.grace):
                return
            sys.stderr.write(f"\ninterrupted: stopping now (the running compiled call does not "
                             f"return for {self.grace:.0f}s)\n")
            sys.stderr.flush()
            if self.on_timeout is not None:
                try:
                    self.on_timeout()
                except Exception as err:  # never block the exit
                    sys.stderr.write(f"could not save partial results: {err}\n")
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(130)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._thread is None:
            return
        if self._sigint_seen or (exc_type is not None and issubclass(exc_type, KeyboardInterrupt)):
            try:  # the watcher's grace starts now at the latest (the command is stopping)
                self._writer.send(bytes([signal.SIGINT]))
            except OSError:
                pass
            return
        self._stop.set()
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None
        signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
        try:
            self._writer.send(b"\0")
        except OSError:
            pass
        self._thread.join(timeout=1.0)
        self._reader.close()
        self._writer.close()
        self._thread = None
