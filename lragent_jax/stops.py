"""Stop strings: where generated text ends. The one definition used by the session (cutting a
turn's output and its tokens) and the workflow (the segment it records). Host-side, no jax."""

from __future__ import annotations

from collections.abc import Sequence


def stop_index(text: str, stop: Sequence[str]) -> int | None:
    """Position of the earliest occurrence of any stop string in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) its first stop string."""
    cut = stop_index(text, stop)
    return text if cut is None else text[:cut]
