"""The engine loop: one thread owns the ``Session`` and its ``TurnBatcher``; HTTP handlers hand it
requests through a thread-safe inbox and get their tokens back through callbacks.

Every loop iteration takes the new requests and cancellations, places waiting requests on rows
(``prefix.RowTable``: the longest verified prefix is reused, the row is cut back to it and the rest
of the prompt appended), and runs ONE jitted call over every pending turn the schedule picks, so
requests from many clients, at different agents and phases, share calls. A generation runs as a
sequence of turns of at most ``block_tokens`` tokens each (its first one a single token when it
streams, to send the first token early): between two blocks new requests join, a cancelled
request stops, and the text streamed so far goes out. A request never waits on a client: events are
handed to the HTTP side without blocking, so a slow reader only delays itself.

Between blocks the generated tokens stay in the row like any turn's (the last one is prefilled at
the start of the next block), so a generation split in blocks gives the tokens of one long turn:
the same greedy tokens, and with a ``seed`` the same sampled tokens for the same request whatever
else runs (each block's key comes from the seed and the trajectory length, as ``Session`` does).

Stop strings: a stop string inside one block ends the row on the device (the session's stop
mask); one that spans two blocks is found in the decoded text after the block, and the row is cut
back to the tokens before it, as the session cuts a turn.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import threading
import time
import traceback
from collections.abc import Callable

from lragent_jax.lora import NO_ADAPTER
from lragent_jax.rollout.engine import Schedule, TurnBatcher
from lragent_jax.serve.metrics import ServerMetrics
from lragent_jax.serve.prefix import RowTable
from lragent_jax.serve.protocol import APIError, GenerationRequest
from lragent_jax.session import Session, Turn


# client round trips (pinned trajectories) the default batch wait is set from
RETURN_WINDOW = 64
MAX_ANSWERED_PINS = 4096  # answered trajectories whose next request is timed


@dataclasses.dataclass(frozen=True)
class Delta:
    """More text of a streaming generation."""

    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    """The end of a generation: the whole ``text`` (``delta``: the part not yet sent as a
    ``Delta``), its token ids and the usage counts."""

    text: str
    delta: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int


@dataclasses.dataclass(frozen=True)
class Failed:
    error: APIError


Event = Delta | Finished | Failed


@dataclasses.dataclass(eq=False)
class _Job:
    id: int
    request: GenerationRequest
    sink: Callable[[Event], None]
    received: float
    agent_index: int = NO_ADAPTER
    row: int | None = None
    state: str = "waiting"  # waiting | pending | done
    tokens: list = dataclasses.field(default_factory=list)
    sent: str = ""
    cached: int | None = None
    prefilled: int = 0
    first_at: float | None = None


def hold_back(text: str, stops: tuple[str, ...]) -> str:
    """The part of a generation's text so far that can be sent: without a trailing replacement
    character (an incomplete multi-byte character) or a trailing piece that may be the start of a
    stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    cut = end
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:k], 0, end):
                cut = min(cut, end - k)
                break
    return text[:cut]


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class Engine:
    """Serves generations from one session (see the module docstring).

    ``block_tokens``: tokens per turn of a generation (0: a whole generation in one turn);
    ``stream_first_token``: a streaming generation's first turn makes one token (its time to first
    token), the others make ``block_tokens``; ``max_waiting``: requests queued for a row at most
    (more are refused with 429); ``batch_wait``: see ``_gather``; ``row_grace``: seconds after an
    answer during which its row is not evicted for another trajectory (``prefix.RowTable``);
    ``call_log``: a file path to which one JSON line per call is appended (``rollout.CallStats``'
    fields and ``end``, seconds since the engine started), to see how calls were made up.
    Thread-safe: ``submit``, ``cancel`` and ``forget`` may be called from any thread; everything
    else runs in the engine thread.
    """

    def __init__(self, session: Session, *, block_tokens: int = 16,
                 stream_first_token: bool = True, schedule: Schedule | None = None,
                 max_waiting: int = 4096, batch_wait: float | None = None,
                 row_grace: float = 0.05, call_log: str | None = None):
        if not isinstance(block_tokens, int) or block_tokens < 0:
            raise ValueError(f"block_tokens must be an int >= 0 (0: no limit); got "
                             f"{block_tokens!r}")
        if not isinstance(max_waiting, int) or max_waiting < 1:
            raise ValueError(f"max_waiting must be an int >= 1; got {max_waiting!r}")
        if batch_wait is not None and not batch_wait >= 0:
            raise ValueError(f"batch_wait must be None (automatic) or seconds >= 0; got "
                             f"{batch_wait!r}")
        self.batch_wait = batch_wait
        try:  # appended to, never truncated
            self._call_log = open(call_log, "a", encoding="utf-8") if call_log else None
        except OSError as e:
            raise ValueError(f"call_log {call_log!r} cannot be opened for appending: {e}") from e
        self._started = time.perf_counter()
        self._last_call = (0.0, 0.0)  # (end, seconds) of the last call
        self._answered = 0  # generations the last call finished: their clients may come back
        self._arrived = 0  # requests received since the last call ended
        self._answered_at: dict[str, float] = {}  # pin -> when its last answer was sent
        self._returns: collections.deque = collections.deque(maxlen=RETURN_WINDOW)
        self.session = session
        self.block_tokens, self.stream_first_token = block_tokens, stream_first_token
        self.max_waiting = max_waiting
        self.batcher = TurnBatcher(session, schedule)
        for _ in range(session.batch):  # the engine keeps every row; the table hands them out
            self.batcher.acquire()
        self.table = RowTable(session.batch, grace=row_grace)
        self.per_agent_view = session.mode.per_agent_view
        # per-agent-view modes: who wrote view 0, which the bare base model shares with the first
        # role (Session's rule); reuse across the two would mix adapters, so it is never done
        self._view0_writer: list[int | None] = [None] * session.batch
        self.metrics = ServerMetrics(
            rows=session.batch, rows_in_use=lambda: sum(1 for t in session.tokens if t),
            rows_busy=lambda: self.table.busy_rows, waiting=lambda: len(self._waiting))
        self._cond = threading.Condition()
        self._inbox: collections.deque = collections.deque()
        self._waiting: list[_Job] = []
        self._jobs: dict[int, _Job] = {}
        self._pending: dict[int, _Job] = {}  # row -> job with a turn in the batcher
        self._next_id = 0
        self._closing = False
        self._freed = False  # a row became idle since waiting requests were last placed
        self._retry_at: float | None = None  # when a row's grace ends for a waiting request
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="lragent-engine", daemon=True)

    # ------------------------------------------------------------------ any thread
    def start(self) -> "Engine":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> int:
        """Queue a generation; ``sink`` gets its events (called from the engine thread: it must not
        block). Returns the job id (for ``cancel``)."""
        with self._cond:
            if not self.alive:
                raise APIError(503, "the engine is not running" + (
                    f" (it stopped on {type(self.error).__name__}: {self.error})"
                    if self.error else ""), type="server_error", code="engine_stopped")
            if len(self._waiting) + len(self._inbox) >= self.max_waiting:
                raise APIError(429, f"{self.max_waiting} requests are already waiting for a row; "
                                    "retry later", type="rate_limit_error", code="queue_full")
            self._next_id += 1
            job = _Job(self._next_id, request, sink, time.perf_counter())
            self._inbox.append(("submit", job))
            self._cond.notify()
            return job.id

    def cancel(self, job_id: int) -> None:
        """Stop a generation (its row is freed before the next call; a turn already in a call
        finishes first). Unknown or finished ids are ignored."""
        with self._cond:
            self._inbox.append(("cancel", job_id))
            self._cond.notify()

    def forget(self, pin: str, timeout: float | None = 30.0) -> bool:
        """The pinned trajectory ``pin`` is done: unpin its row and reuse it first. False when no
        row holds it."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if not self.alive:
                raise APIError(503, "the engine is not running", type="server_error",
                               code="engine_stopped")
            self._inbox.append(("forget", (pin, future)))
            self._cond.notify()
        return future.result(timeout)

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def stats(self) -> dict:
        return {"rows": self.session.batch, "rows_busy": self.table.busy_rows,
                "rows_in_use": sum(1 for t in self.session.tokens if t),
                "waiting": len(self._waiting), "calls": self.batcher.num_calls}

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._closing or self.batcher.has_pending()
                               or self._freed):
                        # a waiting request may take a row once its grace is over
                        retry = self._retry_at
                        wait = 1.0 if retry is None else retry - time.perf_counter()
                        if wait <= 0:
                            break
                        self._cond.wait(timeout=min(wait, 1.0))
                    if self._closing:
                        break
                    commands = list(self._inbox)
                    self._inbox.clear()
                for kind, payload in commands:
                    self._apply(kind, payload)
                self._place_waiting()
                if self.batcher.has_pending():
                    self._gather()
                    self._step()
        except BaseException as e:  # a bug: say so on every request instead of hanging them
            self.error = e
            traceback.print_exc()
        finally:
            with self._cond:
                self._closing = True
                leftover = [job for kind, job in self._inbox if kind == "submit"]
                forgets = [p for kind, p in self._inbox if kind == "forget"]
                self._inbox.clear()
            for pin, future in forgets:
                future.set_result(False)
            reason = (f"the engine stopped on {type(self.error).__name__}: {self.error}"
                      if self.error else "the server is shutting down")
            for job in leftover + list(self._jobs.values()):
                self._fail(job, APIError(503, reason, type="server_error", code="engine_stopped"))
            if self._call_log is not None:
                self._call_log.close()

    def gather_wait(self) -> float:
        """Seconds after the last call's end that the next call may wait for the clients it
        answered (see ``_gather``). ``batch_wait`` when set. Else, once ``RETURN_WINDOW // 4``
        round trips of pinned trajectories were seen (the last ``RETURN_WINDOW`` kept): the wait
        ``w = 1.1 r`` (a margin) for the round trip ``r`` that maximizes ``F(r) - w / C``, with
        ``F(r)`` the share of those round trips of at most ``r`` and ``C`` the last call's
        seconds: a returning client that misses a call waits about a call, every row waits ``w``
        (so clients that come back in a small part of a call are waited for, clients slower than
        that are not: 0 when none is quicker than a call). Before that: a tenth of the last
        call, at most 20 ms."""
        seconds = self._last_call[1]
        if self.batch_wait is not None:
            return self.batch_wait
        if len(self._returns) < RETURN_WINDOW // 4:
            return min(0.1 * seconds, 0.02)
        ordered = sorted(self._returns)
        best, best_score = 0.0, 0.0
        for i, w in enumerate(ordered):
            w *= 1.1  # a margin: waiting exactly w would race the client that took w
            if w >= seconds:
                break
            score = (i + 1) / len(ordered) - w / seconds
            if score > best_score:
                best, best_score = w, score
        return best

    def _gather(self) -> None:
        """Hold the next call a moment for the clients the last call answered: an agent sends its
        next turn right after its answer, and a call that starts before it arrives runs without
        it (and it waits a whole call). At most ``gather_wait()`` seconds after the last call
        ended, and only while a row is idle for them and fewer requests have come in since that
        call ended than it answered (requests that came during the call are the previous
        answers' clients, not these)."""
        end = self._last_call[0]
        deadline = end + self.gather_wait()
        start = time.perf_counter()
        waited = False
        while (self._arrived < self._answered and self.table.busy_rows < self.table.rows
               and time.perf_counter() < deadline):
            waited = True
            with self._cond:
                if not self._inbox and not self._closing:
                    self._cond.wait(max(deadline - time.perf_counter(), 0.0))
                if self._closing:
                    return
                commands = list(self._inbox)
                self._inbox.clear()
            for kind, payload in commands:
                self._apply(kind, payload)
            self._place_waiting()
        if waited:
            with self.metrics:
                self.metrics.gather_seconds.inc(time.perf_counter() - start)
                if (self._arrived < self._answered
                        and self.table.busy_rows < self.table.rows):
                    self.metrics.gather_short.inc()

    def _apply(self, kind: str, payload) -> None:
        if kind == "submit":
            job = payload
            if job.received >= self._last_call[0]:
                self._arrived += 1
            pin = job.request.pin
            if pin is not None and pin in self._answered_at:
                # (>= 0: a request that came while the engine was still sending the answer)
                gap = max(job.received - self._answered_at.pop(pin), 0.0)
                self._returns.append(gap)
                with self.metrics:
                    self.metrics.client_return.observe(gap)
            self._jobs[job.id] = job
            if job.request.agent is not None:
                job.agent_index = self.session.lora.agent_index(job.request.agent)
            self._waiting.append(job)
        elif kind == "cancel":
            job = self._jobs.get(payload)
            if job is None:
                return
            if job.state == "waiting":
                self._waiting.remove(job)
            elif job.state == "pending":
                self.batcher.cancel(job.row)
                self._pending.pop(job.row, None)
            self._finish(job, self._text(job), "cancelled")
        elif kind == "forget":
            pin, future = payload
            self._answered_at.pop(pin, None)
            future.set_result(self.table.forget(pin))

    def _place_waiting(self) -> None:
        self._freed, self._retry_at = False, None
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, []
        for job in waiting:
            if job.state != "waiting":
                continue
            if (self.table.busy_rows == self.table.rows and job.request.pin is None) \
                    or not self._place(job):
                self._waiting.append(job)
        if self._waiting:
            self._retry_at = self.table.grace_ends()

    def _valid(self, view: int, agent_index: int) -> list[int]:
        s = self.session
        if not self.per_agent_view:
            return [int(n) for n in s.filled]
        valid = [int(n) for n in s.processed[:, view]]
        if view == 0:
            for row, writer in enumerate(self._view0_writer):
                if writer is not None and writer != agent_index:
                    valid[row] = 0
        return valid

    def _place(self, job: _Job) -> bool:
        s, request = self.session, job.request
        view = max(job.agent_index, 0)
        placement = self.table.place(request.prompt_ids, s.tokens,
                                     self._valid(view, job.agent_index), request.pin)
        if placement is None:
            return False
        row, keep = placement.row, placement.keep
        conflict = (self.per_agent_view and view == 0 and self._view0_writer[row] is not None
                    and self._view0_writer[row] != job.agent_index)
        if conflict:
            keep = 0  # view 0 holds the other agent's entries: recompute them all
        self.table.acquire(placement, request.pin)
        with self.metrics:
            if placement.evicted:
                self.metrics.evictions.inc()
                self.metrics.evicted_tokens.inc(placement.discarded)
            elif placement.discarded:
                self.metrics.divergences.inc()
        if keep < len(s.tokens[row]):
            s.truncate(row, keep)
        if keep == 0:
            self._view0_writer[row] = None
        if self.per_agent_view and view == 0:
            self._view0_writer[row] = job.agent_index
        job.row, job.state = row, "pending"
        self._submit(job, append=request.prompt_ids[keep:])
        return True

    def _submit(self, job: _Job, append=()) -> None:
        request = job.request
        remaining = request.max_tokens - len(job.tokens)
        block = self.block_tokens or remaining
        if job.first_at is None and request.stream and self.stream_first_token:
            block = 1
        turn = Turn(request.agent, append_ids=tuple(append),
                    settings=request.settings(min(block, remaining)))
        try:
            self.batcher.submit(job.row, turn, tag=job)
        except ValueError as e:
            return self._fail(job, APIError(400, str(e)))
        job.state = "pending"
        self._pending[job.row] = job

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            done = self.batcher.step()
        except Exception as e:  # the call failed (e.g. device memory): the session kept its logs
            traceback.print_exc()
            for row, job in list(self._pending.items()):
                self.batcher.cancel(row)
                self._fail(job, APIError(500, f"the engine call failed: {type(e).__name__}: {e}",
                                         type="server_error", code="engine_error"))
            self._pending.clear()
            return
        end = time.perf_counter()
        self._last_call = (end, end - start)
        self._arrived = 0
        with self.metrics:
            self.metrics.engine_calls.inc()
            self.metrics.engine_seconds.inc(end - start)
            self.metrics.prefill_slots.inc(self.batcher.last_call.prefill_slots)
            rows, chunk = self.batcher.last_shape
            self.metrics.calls_by_shape.inc(rows=rows, chunk_bucket=chunk)
            self.metrics.seconds_by_shape.inc(end - start, rows=rows, chunk_bucket=chunk)
        if self._call_log is not None:
            record = {"end": end - self._started, **dataclasses.asdict(self.batcher.last_call)}
            self._call_log.write(json.dumps(record) + "\n")
            self._call_log.flush()
        answered = len(self._jobs)
        for d in done:
            job = d.tag
            self._pending.pop(d.row, None)
            if d.error is not None:
                self._fail(job, APIError(400, str(d.error)))
            else:
                self._advance(job, d.result, d.call_end)
        self._answered = max(answered - len(self._jobs), 0)

    def _text(self, job: _Job) -> str:
        return self.session.tokenizer.decode(job.tokens) if job.tokens else ""

    def _advance(self, job: _Job, result, call_end: float) -> None:
        request = job.request
        if job.first_at is None:
            job.first_at = call_end
            job.cached = len(request.prompt_ids) - result.prefilled
            with self.metrics:
                self.metrics.ttft.observe(call_end - job.received)
        job.prefilled += result.prefilled
        job.tokens.extend(result.token_ids)
        finish = "stop" if result.stop_reason in ("eos", "stop") else None
        text = self._text(job)
        at = find_stop(text, request.stop) if request.stop else None
        if at is not None:
            text, finish = self._cut(job, text[:at]), "stop"
        if finish is None and len(job.tokens) >= request.max_tokens:
            finish = "length"
        if finish is not None:
            return self._finish(job, text, finish)
        if request.stream:
            visible = hold_back(text, request.stop)
            if len(visible) > len(job.sent) and visible.startswith(job.sent):
                self._send(job, Delta(visible[len(job.sent):]))
                job.sent = visible
        self._submit(job)

    def _cut(self, job: _Job, text: str) -> str:
        """Keep the generated tokens whose text is a prefix of ``text`` (and the rest of ``text``
        re-tokenized), in the job and in its row."""
        decode, gen = self.session.tokenizer.decode, job.tokens
        lo, hi = 0, len(gen)  # the longest token prefix whose text is a prefix of ``text``
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if text.startswith(decode(gen[:mid])):
                lo = mid
            else:
                hi = mid - 1
        tail = text[len(decode(gen[:lo])):]
        tail_ids = list(self.session.tokenizer.encode(tail)) if tail else []
        s, row, start = self.session, job.row, len(job.request.prompt_ids)
        s.truncate(row, start + lo)
        try:
            s.append_tokens(row, tail_ids)
        except ValueError:  # no room left for the re-tokenized tail: the row ends before it
            tail_ids = []
        job.tokens = gen[:lo] + tail_ids
        return text

    def _send(self, job: _Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:  # the receiving side is gone (e.g. its event loop closed)
            pass

    def _end(self, job: _Job) -> None:
        job.state = "done"
        self._jobs.pop(job.id, None)
        if job.row is not None and self.table.busy(job.row):
            self.table.release(job.row)
            self._freed = True  # a waiting request may take it

    def _finish(self, job: _Job, text: str, reason: str) -> None:
        request = job.request
        delta = text[len(job.sent):] if text.startswith(job.sent) else ""
        cached = job.cached or 0
        self._end(job)
        with self.metrics:
            m, name = self.metrics, request.model
            m.finished.inc(model=name, reason=reason)
            m.prompt_tokens.inc(len(request.prompt_ids), model=name)
            m.cached_tokens.inc(cached, model=name)
            m.prefilled_tokens.inc(job.prefilled, model=name)
            m.completion_tokens.inc(len(job.tokens), model=name)
            if cached:
                m.cache_hits.inc(model=name)
            m.latency.observe(time.perf_counter() - job.received)
        self._send(job, Finished(text=text, delta=delta, token_ids=tuple(job.tokens),
                                 finish_reason=reason, prompt_tokens=len(request.prompt_ids),
                                 cached_tokens=cached, prefilled_tokens=job.prefilled))
        if request.pin is not None and reason != "cancelled":
            self._answered_at.pop(request.pin, None)  # re-inserted last: the newest
            self._answered_at[request.pin] = time.perf_counter()
            if len(self._answered_at) > MAX_ANSWERED_PINS:  # pins never sent again nor forgotten
                self._answered_at.pop(next(iter(self._answered_at)))

    def _fail(self, job: _Job, error: APIError) -> None:
        if job.state == "done":
            return
        self._end(job)
        with self.metrics:
            self.metrics.finished.inc(model=job.request.model, reason="error")
        self._send(job, Failed(error))
