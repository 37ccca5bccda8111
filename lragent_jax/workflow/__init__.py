"""Multi-agent episodes over one shared, append-only trajectory, independent of how text is generated.

An episode's trajectory is a sequence of SEGMENTS, each written by one writer: ``"env"`` (instruction,
question, templates, tool observations) or a role name (``"plan"``, ``"action"``, ...). Token-level code
tokenizes every segment on its own and concatenates the pieces, so a role boundary never merges BPE
tokens; training uses the same segmentation. The text only ever grows.

Modules:
- ``types``: the records (``Segment``, ``TurnSpec``, ``TurnRequest``, ``TurnOutput``, ``EpisodeRecord``
  ...) and the two protocols: ``Workflow`` decides who speaks next and what env text comes before;
  ``Policy`` produces text for a batch of turns (the model-backed one, which keeps the KV cache, is
  ``lragent_jax.agents.ModelPolicy``).
- ``react``: the paper's plan / action / reflect loop (``ReActWorkflow``, ``ReActTemplates``).
- ``round_robin``: ``RoundRobinWorkflow``, a minimal other order.
- ``driver``: ``run_episodes`` steps all episodes in lockstep, one batched ``policy.turns`` call per
  step, through per-episode steps the rollout engine reuses.
- ``scripted``: ``ScriptedPolicy``, text from a function.
- ``samples``: the role-sample (training-sample) format, its files and the validation split.

Gold trajectories are produced by running a ``ScriptedPolicy`` through ``run_episodes``, so a training
prompt is byte-identical to the prompt the model sees at inference.

Host-side only: pure Python, no jax.
"""

from lragent_jax.workflow.driver import (RunningEpisode, finish_episode, next_spec, record_output,
                                         run_episodes, start_episode)
from lragent_jax.workflow.react import ReActState, ReActTemplates, ReActWorkflow, Tool
from lragent_jax.workflow.round_robin import RoundRobinState, RoundRobinWorkflow
from lragent_jax.workflow.samples import per_role_samples
from lragent_jax.workflow.scripted import Responder, ScriptedPolicy
from lragent_jax.workflow.types import (ENV, STOP_REASONS, EpisodeRecord, EpisodeResult, Policy,
                                        Segment, TurnLog, TurnOutput, TurnRequest, TurnSpec, Workflow,
                                        clean_output)

__all__ = [
    "ENV", "STOP_REASONS", "EpisodeRecord", "EpisodeResult", "Policy", "ReActState",
    "ReActTemplates", "ReActWorkflow", "Responder", "RoundRobinState", "RoundRobinWorkflow",
    "RunningEpisode", "ScriptedPolicy", "Segment", "Tool", "TurnLog", "TurnOutput", "TurnRequest",
    "TurnSpec", "Workflow", "clean_output", "finish_episode", "next_spec", "per_role_samples",
    "record_output", "run_episodes", "start_episode",
]
