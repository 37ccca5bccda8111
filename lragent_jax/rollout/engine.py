"""Continuous batching of turns and episodes over the rows of one ``Session``.

Two layers:

- ``TurnBatcher``, the scheduling core: rows are acquired (reset) and released; a busy row has at
  most one pending turn; ``step()`` runs ONE ``Session.turn`` for the pending turns a ``Schedule``
  picks (rows at different agents and phases together) and hands back each row's result or error.
  Anything that produces turns feeds it: the episode loop below, or a server's requests.
- ``RolloutEngine``: runs a stream of ``Episode`` objects (a workflow on a task, a trace replay) so
  that every row is always busy: when an episode ends, its row is released, the next episode
  starts there and its first turn joins the next call. Results stream back in stream order or as
  they finish.

Faults stay with their episode: an episode whose code raises (a workflow, a tool with
``tool_errors="raise"``, a prompt longer than the row) ends as failed with the error recorded, and
a turn the session refuses (``ValueError``: capacity, token ids, agent) fails only its row, found
by splitting the call. Device errors are not caught.

Timing: a turn's tokens come back from the device together at the end of its call, so the time to
first token of a turn is measured from the moment the turn was ready (submitted) to the end of the
call that ran its prefill and first token; an episode may split a turn into a first call and a
``Continuation`` (as the trace replay does) to get its first token early.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from lragent_jax.generate import bucket
from lragent_jax.session import Session, Turn, TurnResult


# ----------------------------------------------------------------------------------- scheduling


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which pending turns run together in one call.

    A call's prefill computes every row of the session over the call's longest chunk rounded up to
    a power of two (the padded length), so one row's long prefill (a prompt, a tool observation, a
    non-shared agent catching up) makes all rows pay for it. Short turns (at most ``long_prefill``
    tokens to prefill) run in every call. Long turns join a call only when real tokens fill at least
    ``long_fill`` of its padded prefill (rows x padded length; the longest padded length that does
    is chosen, with every pending turn that fits in it), when nothing short is pending, or when one
    of them has been passed over ``max_wait`` times. ``long_prefill=None`` runs every pending turn
    in every call. With the session's packed long-prefill lane (``Session(long_lane=...)``), long
    turns join at once: the lane packs their chunks' segments, so a call's prefill costs about the
    tokens it brings, and holding them back saves nothing and costs the call a later one would
    share.
    Scheduling never changes an episode's tokens, only when they run.
    """

    long_prefill: int | None = 512
    long_fill: float = 0.5
    max_wait: int = 8

    def __post_init__(self):
        if self.long_prefill is not None and (not isinstance(self.long_prefill, int)
                                              or self.long_prefill < 1):
            raise ValueError(f"long_prefill must be an int >= 1 or None; got {self.long_prefill!r}")
        if not 0 <= self.long_fill <= 1:
            raise ValueError(f"long_fill must be in [0, 1]; got {self.long_fill}")
        if not isinstance(self.max_wait, int) or self.max_wait < 0:
            raise ValueError(f"max_wait must be an int >= 0; got {self.max_wait!r}")

    def select(self, pending: list[PendingTurn], rows: int,
               min_bucket: int = 16, lane_rows: int = 0) -> list[PendingTurn]:
        """The turns of the next call, from ``pending`` (non-empty, one kind) in a session of
        ``rows`` rows whose smallest padded chunk is ``min_bucket``; ``lane_rows``: the most long
        chunks the session's long-prefill lane takes (its rows; 0: no lane)."""
        if self.long_prefill is None:
            return pending
        short = [p for p in pending if p.chunk <= self.long_prefill]
        if len(short) == len(pending) or not short or len(pending) - len(short) <= lane_rows:
            return pending
        if any(p.waited >= self.max_wait for p in pending if p.chunk > self.long_prefill):
            return pending
        padded = {id(p): bucket(p.chunk, min_bucket) for p in pending}
        for length in sorted({padded[id(p)] for p in pending}, reverse=True):
            if length <= self.long_prefill:
                break
            group = [p for p in pending if padded[id(p)] <= length]
            if sum(p.chunk for p in group) >= self.long_fill * rows * length:
                return group
        return short


@dataclasses.dataclass
class PendingTurn:
    """A submitted turn waiting for a call. ``chunk``: tokens its agent must prefill."""

    row: int
    turn: Turn
    tag: Any
    ready: float  # time.perf_counter() at submission
    chunk: int
    waited: int = 0  # calls that ran without it


@dataclasses.dataclass(frozen=True)
class TurnDone:
    """A finished turn: ``result`` or ``error`` (the session refused this row's turn)."""

    row: int
    turn: Turn
    tag: Any
    result: TurnResult | None
    error: Exception | None
    ready: float
    call_start: float
    call_end: float


@dataclasses.dataclass(frozen=True)
class CallStats:
    """One jitted call: rows in it (and their agents), its longest chunk and padded chunk, tokens,
    seconds; its long-prefill lane's segments per step (0: none), the row x position slots its
    prefill computed, its decode steps (the most tokens a row generated: the call decodes until
    every row is done) and each row's chunk (tokens prefilled)."""

    rows: int
    agents: tuple
    chunk_max: int
    chunk_bucket: int
    prefilled: int
    generated: int
    seconds: float
    long_lane: int = 0
    prefill_slots: int = 0
    decode_steps: int = 0
    chunks: tuple = ()


class TurnBatcher:
    """The scheduling core over one session's rows (see the module docstring).

    ``record_calls``: keep a ``CallStats`` per call in ``calls`` (totals are always kept). Not
    thread-safe: drive it from one thread (a server hands requests to the loop that steps it).
    """

    def __init__(self, session: Session, schedule: Schedule | None = None, *,
                 record_calls: bool = False):
        if not isinstance(session, Session):
            raise ValueError(f"session must be a Session; got {type(session).__name__}")
        self.session = session
        self.schedule = schedule if schedule is not None else Schedule()
        self._free = list(range(session.batch))
        self._busy: set[int] = set()
        self._pending: dict[int, PendingTurn] = {}
        self.record_calls = record_calls
        self.calls: list[CallStats] = []
        self.num_calls = 0
        self.call_seconds = 0.0
        self.padded_prefill = 0  # row x position slots the calls' prefills computed
        self.last_shape = (0, 0)  # (rows, padded chunk) of the last call
        self.last_call: CallStats | None = None

    # ------------------------------------------------------------------ rows
    @property
    def rows(self) -> int:
        return self.session.batch

    @property
    def free_rows(self) -> int:
        return len(self._free)

    @property
    def busy_rows(self) -> int:
        return len(self._busy)

    def acquire(self) -> int:
        """A free row, reset (no trajectory, no counts); the lowest free index first."""
        if not self._free:
            raise RuntimeError(f"all {self.rows} rows are busy; release one first")
        row = self._free.pop(0)
        self.session.reset([row])
        self._busy.add(row)
        return row

    def release(self, row: int) -> None:
        """Give a busy row back (its pending turn, if any, is dropped)."""
        if row not in self._busy:
            raise ValueError(f"row {row} is not busy; busy rows: {sorted(self._busy)}")
        self._pending.pop(row, None)
        self._busy.discard(row)
        self._free.append(row)
        self._free.sort()

    # ------------------------------------------------------------------ turns
    def submit(self, row: int, turn: Turn, tag: Any = None) -> PendingTurn:
        """Queue ``turn`` for busy ``row`` (one pending turn per row); ``tag`` comes back with the
        result."""
        if row not in self._busy:
            raise ValueError(f"row {row} is not busy: acquire it before submitting a turn")
        if row in self._pending:
            raise ValueError(f"row {row} already has a pending turn")
        if not isinstance(turn, Turn):
            raise ValueError(f"turn must be a session Turn; got {type(turn).__name__}")
        if turn.append:  # tokenized once here; the session would do the same
            ids = self.session.tokenizer.encode(turn.append) + list(turn.append_ids)
            turn = dataclasses.replace(turn, append="", append_ids=tuple(ids))
        pending = PendingTurn(row, turn, tag, time.perf_counter(), self._chunk(row, turn))
        self._pending[row] = pending
        return pending

    def cancel(self, row: int) -> bool:
        """Drop ``row``'s pending turn; True when there was one."""
        return self._pending.pop(row, None) is not None

    def has_pending(self) -> bool:
        return bool(self._pending)

    def _chunk(self, row: int, turn: Turn) -> int:
        """Tokens the turn's agent will prefill (the session's rule; used for scheduling only)."""
        s = self.session
        length = len(s.tokens[row]) + len(turn.append_ids)
        total = length + len(turn.score_tokens or ())
        view = 0
        if s.mode.per_agent_view and turn.agent is not None and s.lora is not None:
            try:
                view = max(s.lora.agent_index(turn.agent), 0)
            except (ValueError, KeyError, IndexError):
                view = 0  # the session names the bad agent when the turn runs
        start = s.processed[row, view] if s.mode.per_agent_view else s.filled[row]
        return int(total - min(int(start), max(length - 1, 0)))

    def step(self) -> list[TurnDone]:
        """Run one call over the turns the schedule picks; [] when nothing is pending."""
        if not self._pending:
            return []
        pending = sorted(self._pending.values(), key=lambda p: p.ready)
        # a call either scores on every row or generates on every row: the oldest turn's kind
        scoring = pending[0].turn.score_tokens is not None
        pending = [p for p in pending if (p.turn.score_tokens is not None) == scoring]
        lane_rows = 0 if scoring else self.session.long_lane_rows
        chosen = self.schedule.select(pending, self.rows, self.session.min_chunk_bucket,
                                      lane_rows=lane_rows)
        for p in self._pending.values():
            if p not in chosen:
                p.waited += 1
        for p in chosen:
            del self._pending[p.row]
        turns = {p.row: p.turn for p in chosen}
        start = time.perf_counter()
        slots = self.session.prefill_slots
        results, errors = self._run(turns)
        end = time.perf_counter()
        self._account(chosen, results, end - start, self.session.prefill_slots - slots)
        return [TurnDone(p.row, p.turn, p.tag, results.get(p.row), errors.get(p.row), p.ready,
                         start, end) for p in chosen]

    def _run(self, turns: Mapping[int, Turn]) -> tuple[dict, dict]:
        """``session.turn``; a turn the session refuses fails alone: the call is split in halves
        until the refused rows are found (the session changes nothing when it refuses a turn)."""
        s = self.session
        lengths = {row: len(s.tokens[row]) for row in turns}
        try:
            return s.turn(turns), {}
        except ValueError as error:
            if any(len(s.tokens[row]) != n for row, n in lengths.items()):
                raise  # not a refusal: the session had already started the turn
            if len(turns) == 1:
                return {}, {next(iter(turns)): error}
        rows = sorted(turns)
        results, errors = {}, {}
        for half in (rows[:len(rows) // 2], rows[len(rows) // 2:]):
            r, e = self._run({row: turns[row] for row in half})
            results.update(r)
            errors.update(e)
        return results, errors

    def _account(self, chosen, results, seconds, slots) -> None:
        chunk_max = max(p.chunk for p in chosen)
        padded = bucket(chunk_max, self.session.min_chunk_bucket)
        self.num_calls += 1
        self.call_seconds += seconds
        self.padded_prefill += slots
        self.last_shape = (len(chosen), padded)
        self.last_call = CallStats(
            rows=len(chosen), agents=tuple(p.turn.agent for p in chosen),
            chunk_max=chunk_max, chunk_bucket=padded, long_lane=self.session.last_long_lane,
            prefill_slots=slots, prefilled=sum(r.prefilled for r in results.values()),
            generated=sum(len(r.token_ids) for r in results.values()), seconds=seconds,
            decode_steps=max((len(r.token_ids) for r in results.values()), default=0),
            chunks=tuple(p.chunk for p in chosen))
        if self.record_calls:
            self.calls.append(self.last_call)


# ----------------------------------------------------------------------------------- episodes


@dataclasses.dataclass(frozen=True)
class Continuation:
    """Returned by ``Episode.next_turn``: a call that continues the previous turn (its first token
    was already timed), e.g. the decode part of a turn whose first call generated one token."""

    turn: Turn


class Episode(Protocol):
    """One episode on one row. The engine calls ``begin`` once, then alternates ``next_turn`` (a
    ``Turn``, a ``Continuation``, or None when the episode is over) and ``on_result`` with that
    turn's result; ``record()`` gives the outcome (also after a failure: what there is). Any
    exception ends the episode as failed. ``task``: what the episode runs on, reported back;
    ``out_of_capacity`` (optional): a turn found no room left in the row."""

    task: Any

    def begin(self, session: Session, row: int, index: int) -> None: ...

    def next_turn(self) -> Turn | Continuation | None: ...

    def on_result(self, result: TurnResult) -> None: ...

    def record(self) -> Any: ...


@dataclasses.dataclass(frozen=True)
class RolloutResult:
    """One episode of a rollout.

    ``index``: position in the stream of tasks; ``record``: the episode's outcome (an
    ``EpisodeRecord`` for workflows); ``error``: why it failed, None when it ran to its end;
    ``prefilled``: tokens each agent prefilled; ``generated``: tokens decoded on the device;
    ``ttft_s`` / ``turn_s``: per turn, seconds from the turn being ready to its first token and to
    its last; ``started_s`` / ``finished_s``: since the run started.
    """

    index: int
    task: Any
    record: Any
    error: str | None
    row: int | None
    calls: int
    prefilled: dict[str, int]
    generated: int
    ttft_s: tuple[float, ...]
    turn_s: tuple[float, ...]
    started_s: float
    finished_s: float
    out_of_capacity: bool = False
    exception: BaseException | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def prefilled_total(self) -> int:
        return sum(self.prefilled.values())


@dataclasses.dataclass(frozen=True)
class RolloutProgress:
    """Counters after a call, for a progress display."""

    done: int
    failed: int
    running: int
    total: int | None
    calls: int
    generated: int
    prefilled: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def episodes_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0


class ProgressBar:
    """A one-line progress display for ``progress=``: episodes done (failed), generated tokens/s,
    calls. Redraws in place on a terminal, else prints a line every ``every_s`` seconds."""

    def __init__(self, total: int | None = None, *, label: str = "", stream=None,
                 every_s: float | None = None):
        self.total, self.label = total, label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s if every_s is not None else (0.2 if self.tty else 10.0)
        self._last = -float("inf")
        self._shown: RolloutProgress | None = None

    def __call__(self, p: RolloutProgress) -> None:
        now = time.perf_counter()
        if (now - self._last < self.every_s and p.running) or (
                self._shown is not None and (p.done, p.calls) == (self._shown.done,
                                                                   self._shown.calls)):
            return
        self._last, self._shown = now, p
        total = p.total if p.total is not None else self.total
        of = f"/{total}" if total is not None else ""
        line = (f"{self.label}{' ' if self.label else ''}{p.done}{of} episodes"
                f"{f' ({p.failed} failed)' if p.failed else ''}, {p.running} running | "
                f"{p.tokens_per_s:,.0f} gen tok/s | {p.episodes_per_s:.2f} ep/s | {p.calls} calls "
                f"| {p.elapsed_s:.0f}s")
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._shown is not None:
            self.stream.write("\n")
            self.stream.flush()


@dataclasses.dataclass
class _Active:
    index: int
    episode: Any
    row: int
    started: float
    calls: int = 0
    ttft: list = dataclasses.field(default_factory=list)
    turn_s: list = dataclasses.field(default_factory=list)
    turn_ready: float | None = None  # when the current turn was first submitted
    first_token_at: float | None = None
    last_token_at: float | None = None

    def close_turn(self) -> None:
        if self.turn_ready is not None and self.first_token_at is not None:
            self.ttft.append(self.first_token_at - self.turn_ready)
            self.turn_s.append(self.last_token_at - self.turn_ready)
        self.turn_ready = self.first_token_at = self.last_token_at = None


class RolloutEngine:
    """Runs a stream of episodes over the rows of ``session``, every row always busy.

    ``schedule``: which pending turns share a call (``Schedule``). ``progress``: called with a
    ``RolloutProgress`` after every call (e.g. a ``ProgressBar``). ``record_calls``: keep per-call
    statistics in ``self.batcher.calls``.
    """

    def __init__(self, session: Session, *, schedule: Schedule | None = None, progress=None,
                 record_calls: bool = False):
        self.session = session
        self.batcher = TurnBatcher(session, schedule, record_calls=record_calls)
        self.progress = progress

    def run(self, episodes: Iterable[Episode], *, ordered: bool = True,
            total: int | None = None) -> Iterator[RolloutResult]:
        """Yield one ``RolloutResult`` per episode: in stream order (``ordered``) or as they finish.

        ``episodes`` is consumed lazily, one episode whenever a row is free. ``total``: the stream's
        length, for the progress display (taken from ``len(episodes)`` when it has one).
        """
        if total is None and hasattr(episodes, "__len__"):
            total = len(episodes)
        stream = _Stream(self.session, self.batcher, iter(episodes), ordered=ordered, total=total,
                         progress=self.progress)
        try:
            while True:
                stream.fill()
                yield from stream.take()
                if not self.batcher.has_pending():
                    break  # every row is free and the stream is exhausted
                for done in self.batcher.step():
                    stream.on_done(done)
                stream.report()
            stream.report()
            yield from stream.take()
        finally:
            stream.release_all()  # the caller stopped early: give the rows back


class _Stream:
    """The state of one ``RolloutEngine.run``: the episodes on rows, the results not yet given
    out, and the counts the progress display shows."""

    def __init__(self, session: Session, batcher: TurnBatcher, source: Iterator[Episode], *,
                 ordered: bool, total: int | None, progress):
        self.session, self.batcher, self.source = session, batcher, source
        self.ordered, self.total, self.progress = ordered, total, progress
        self.active: dict[int, _Active] = {}
        self.out: list[RolloutResult] = []
        self.held: dict[int, RolloutResult] = {}
        self.counts = {"next": 0, "emit": 0, "done": 0, "failed": 0, "generated": 0,
                       "prefilled": 0}
        self.exhausted = False
        self.t0 = time.perf_counter()

    def take(self) -> list[RolloutResult]:
        """The results ready to give out (in stream order when ``ordered``), now given."""
        out, self.out = self.out, []
        return out

    def release_all(self) -> None:
        for row in list(self.active):
            self.batcher.release(row)

    def finish(self, act: _Active, error: BaseException | None) -> None:
        """End an episode: its result, its row freed."""
        session, counts = self.session, self.counts
        act.close_turn()
        try:
            record = act.episode.record()
        except Exception as e:  # no record to give; the episode's own error is kept first
            record, error = None, error or e
        row = act.row
        names = session.agent_names
        prefilled = {names[i]: int(n) for i, n in enumerate(session.prefilled[row])}
        generated = int(session.decoded[row].sum())
        result = RolloutResult(
            index=act.index, task=getattr(act.episode, "task", None), record=record,
            error=None if error is None else f"{type(error).__name__}: {error}", row=row,
            calls=act.calls, prefilled=prefilled, generated=generated,
            ttft_s=tuple(act.ttft), turn_s=tuple(act.turn_s), started_s=act.started - self.t0,
            finished_s=time.perf_counter() - self.t0,
            out_of_capacity=bool(getattr(act.episode, "out_of_capacity", False)),
            exception=error)
        del self.active[row]
        self.batcher.release(row)
        counts["done"] += 1
        counts["failed"] += error is not None
        counts["generated"] += generated
        counts["prefilled"] += sum(prefilled.values())
        if self.ordered:
            self.held[result.index] = result
            while counts["emit"] in self.held:
                self.out.append(self.held.pop(counts["emit"]))
                counts["emit"] += 1
        else:
            self.out.append(result)

    def advance(self, act: _Active) -> None:
        """Submit the episode's next turn, or finish it."""
        try:
            nxt = act.episode.next_turn()
        except Exception as e:
            return self.finish(act, e)
        if nxt is None:
            return self.finish(act, None)
        if isinstance(nxt, Continuation):
            turn = nxt.turn
        else:
            act.close_turn()
            turn = nxt
        if not isinstance(turn, Turn):
            return self.finish(act, ValueError(f"next_turn must return a Turn, a Continuation or "
                                               f"None; got {nxt!r}"))
        try:
            pending = self.batcher.submit(act.row, turn, tag=act)
        except ValueError as e:
            return self.finish(act, e)
        if act.turn_ready is None:
            act.turn_ready = pending.ready

    def fill(self) -> None:
        """Start episodes from the stream on every free row."""
        while self.batcher.free_rows and not self.exhausted:
            try:
                episode = next(self.source)
            except StopIteration:
                self.exhausted = True
                break
            index = self.counts["next"]
            self.counts["next"] += 1
            row = self.batcher.acquire()
            act = _Active(index, episode, row, time.perf_counter())
            self.active[row] = act
            try:
                episode.begin(self.session, row, index)
            except Exception as e:
                self.finish(act, e)
                continue
            self.advance(act)

    def on_done(self, done) -> None:
        """A turn the last call ran: hand its result to the episode and go on."""
        act = done.tag
        act.calls += 1
        if done.error is not None:
            return self.finish(act, done.error)
        if act.first_token_at is None:
            act.first_token_at = done.call_end
        act.last_token_at = done.call_end
        try:
            act.episode.on_result(done.result)
        except Exception as e:
            return self.finish(act, e)
        self.advance(act)

    def report(self) -> None:
        if self.progress is not None:
            counts = self.counts
            self.progress(RolloutProgress(
                done=counts["done"], failed=counts["failed"], running=len(self.active),
                total=self.total, calls=self.batcher.num_calls,
                generated=counts["generated"] + sum(int(self.session.decoded[r].sum())
                                                    for r in self.active),
                prefilled=counts["prefilled"], elapsed_s=time.perf_counter() - self.t0))
