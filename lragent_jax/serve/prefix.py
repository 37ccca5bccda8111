"""Which row a request runs on, and how much of its prompt the cache already holds.

The server keeps its trajectories as the rows of one ``Session``: a row's token log is exactly what
its cache entries were computed from. A request's prompt tokens are compared token by token with
each idle row's log; the longest common prefix is the only part that may be reused (never a prefix
that was not checked token by token), whichever agent wrote it. The row is then cut back to that
prefix (``Session.truncate``) and the rest of the prompt appended, so the agent prefills only what
the row did not hold. How many of the kept tokens the agent may really skip is the mode's rule:
in the shared modes every kept token whose entries are in the cache, in ``non_shared`` and
``base_shared`` only those its own cache view has processed (reuse per adapter, as vLLM and SGLang
reuse a prefix per LoRA adapter).

Choosing the row (``RowTable.place``), for an idle row with common prefix ``c``, reusable tokens
``gain`` and ``loss = len(log) - c`` tokens it would lose:

1. A request pinned to a trajectory (``trajectory`` or ``user`` field) that already has a row
   uses that row (waiting while it is busy), whatever it loses.
2. Otherwise, among idle rows not pinned to another trajectory, the one with the largest
   ``gain - loss`` when that is positive (an extension loses nothing; a retry of the same prompt
   cuts only the old completion; ties: the row that loses less, then the most recently used).
3. Else an empty row.
4. Else the least recently used idle row is evicted (any trajectory; a pin on it is dropped),
   but not one answered less than ``grace`` seconds ago: an agent sends its next turn right
   after an answer, and evicting its trajectory then would make it prefill everything again
   (with more clients than rows every trajectory would be lost between its turns).
5. Else (every row busy, or in its grace) the request waits.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token-id sequences."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    a, b = a[:n], b[:n]
    if a == b or list(a) == list(b):  # the usual case (a prompt extends a row): compared in C
        return n
    diff = np.flatnonzero(np.asarray(a, np.int64) != np.asarray(b, np.int64))
    return int(diff[0])


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a request runs: cut ``row`` to its first ``keep`` tokens, then append the rest of
    the prompt. ``reuse``: prompt tokens the agent will not prefill (the cached tokens);
    ``discarded``: tokens of the row's log that are cut off; ``evicted``: the row held a
    trajectory the request has nothing in common with past ``keep`` and it is given up to a new
    one (least recently used); ``pinned``: the row is the request's own pinned trajectory."""

    row: int
    keep: int
    reuse: int
    discarded: int
    evicted: bool = False
    pinned: bool = False


@dataclasses.dataclass
class _Row:
    owner: str | None = None  # the trajectory pinned to this row
    busy: bool = False
    last_used: int = 0  # logical clock of the last release
    released_at: float = -float("inf")  # time.perf_counter() of the last release
    released: bool = False  # its owner said it is done: the first to be reused, not an eviction


class RowTable:
    """Row ownership, busy flags and recency for ``rows`` rows (host bookkeeping only; the
    caller holds the token logs). ``grace``: seconds after its release during which a row is not
    evicted. Not thread-safe: used by the engine loop alone."""

    def __init__(self, rows: int, grace: float = 0.0):
        if rows < 1:
            raise ValueError(f"rows must be >= 1; got {rows}")
        if not grace >= 0:
            raise ValueError(f"grace must be seconds >= 0; got {grace!r}")
        self.grace = grace
        self._rows = [_Row() for _ in range(rows)]
        self._pins: dict[str, int] = {}
        self._clock = 0

    @property
    def rows(self) -> int:
        return len(self._rows)

    def busy(self, row: int) -> bool:
        return self._rows[row].busy

    @property
    def busy_rows(self) -> int:
        return sum(r.busy for r in self._rows)

    def owner(self, row: int) -> str | None:
        return self._rows[row].owner

    def pinned_row(self, pin: str) -> int | None:
        return self._pins.get(pin)

    def place(self, prompt: Sequence[int], logs: Sequence[Sequence[int]],
              valid: Sequence[int], pin: str | None = None,
              now: float | None = None) -> Placement | None:
        """The placement of a request with ``prompt`` tokens (non-empty), or None when it must
        wait for a row. ``logs[r]``: row r's token log; ``valid[r]``: how many of its first tokens
        have cache entries this request's agent may reuse; ``now``: time.perf_counter()."""
        if not prompt:
            raise ValueError("a request needs at least one prompt token")
        prompt = prompt if isinstance(prompt, list) else list(prompt)  # compared with list logs
        need = len(prompt) - 1  # the last prompt token always runs (it predicts the first output)

        def measure(row: int) -> tuple[int, int, int]:
            c = common_prefix(prompt, logs[row])
            return c, min(c, int(valid[row]), need), len(logs[row]) - c

        if pin is not None and pin in self._pins:
            row = self._pins[pin]
            if self._rows[row].busy:
                return None
            c, gain, loss = measure(row)
            return Placement(row, c, gain, loss, pinned=True)
        best = None
        for row, state in enumerate(self._rows):
            if state.busy or state.owner is not None:
                continue
            c, gain, loss = measure(row)
            key = (gain - loss, -loss, state.last_used)
            if gain - loss > 0 and (best is None or key > best[0]):
                best = (key, Placement(row, c, gain, loss))
        if best is not None:
            return best[1]
        for row, state in enumerate(self._rows):
            if not state.busy and state.owner is None and not logs[row]:
                return Placement(row, 0, 0, 0)
        now = time.perf_counter() if now is None else now
        idle = [row for row, state in enumerate(self._rows) if not state.busy and (
            state.released or now - state.released_at >= self.grace)]
        if not idle:
            return None
        row = min(idle, key=lambda r: (not self._rows[r].released, self._rows[r].last_used, r))
        c, gain, loss = measure(row)
        return Placement(row, c, gain, loss, evicted=loss > 0 and not self._rows[row].released)

    def acquire(self, placement: Placement, pin: str | None = None) -> None:
        """Mark the placement's row busy (and pinned to ``pin``; an evicted row loses its pin)."""
        state = self._rows[placement.row]
        if state.busy:
            raise RuntimeError(f"row {placement.row} is already busy")
        if state.owner is not None and state.owner != pin:
            del self._pins[state.owner]
            state.owner = None
        if pin is not None:
            old = self._pins.get(pin)
            if old is not None and old != placement.row:
                self._rows[old].owner = None
            self._pins[pin] = placement.row
            state.owner = pin
        state.busy, state.released = True, False

    def release(self, row: int, now: float | None = None) -> None:
        """The request on ``row`` is over: the row is idle, most recently used."""
        self._clock += 1
        state = self._rows[row]
        state.busy, state.last_used = False, self._clock
        state.released_at = time.perf_counter() if now is None else now

    def grace_ends(self, now: float | None = None) -> float | None:
        """When the first idle row still in its grace may be evicted (None: no such row)."""
        now = time.perf_counter() if now is None else now
        ends = [state.released_at + self.grace for state in self._rows
                if not state.busy and not state.released and state.released_at + self.grace > now]
        return min(ends) if ends else None

    def forget(self, pin: str) -> bool:
        """The trajectory ``pin`` is done: its row stays as it is (its prefix may still be reused)
        but is unpinned and the first to be reused. False when no row holds that pin."""
        row = self._pins.pop(pin, None)
        if row is None:
            return False
        self._rows[row].owner = None
        self._rows[row].released = True
        return True
