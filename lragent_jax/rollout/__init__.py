"""Many episodes at once: continuous batching over a session's rows, sized by a memory budget.

    from lragent_jax.rollout import run_workflow, plan_rows

    for result in run_workflow(workflow, tasks, session, progress=True):
        print(result.index, result.ok, result.record.answer)

- ``engine``: ``TurnBatcher`` (the scheduling core: rows, pending turns, one jitted call per step;
  what a server feeds), ``RolloutEngine`` (every row always busy with an episode from a stream),
  ``Schedule``, ``RolloutResult``, ``ProgressBar``.
- ``episodes``: ``WorkflowEpisode`` (a workflow on a task, as ``run_episodes`` runs it),
  ``TraceEpisode`` (trace replay), ``run_workflow``, ``run_traces``.
- ``budget``: ``plan_rows`` (rows of a mode that fit a device-memory budget), ``device_free_bytes``.
"""

from lragent_jax.rollout.budget import (RowBudget, activation_bytes_per_row, device_free_bytes,
                                        plan_rows)
from lragent_jax.rollout.engine import (CallStats, Continuation, Episode, PendingTurn,
                                        ProgressBar, RolloutEngine, RolloutProgress,
                                        RolloutResult, Schedule, TurnBatcher, TurnDone)
from lragent_jax.rollout.episodes import (TraceEpisode, WorkflowEpisode,
                                          episode_seed, run_traces, run_workflow)

__all__ = [
    "CallStats", "Continuation", "Episode", "PendingTurn", "ProgressBar", "RolloutEngine",
    "RolloutProgress", "RolloutResult", "RowBudget", "Schedule",
    "TraceEpisode", "TurnBatcher", "TurnDone", "WorkflowEpisode", "activation_bytes_per_row",
    "device_free_bytes", "episode_seed", "plan_rows", "run_traces", "run_workflow",
]
