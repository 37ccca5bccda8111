"""Built-in tasks for the agents, and scoring of their episodes (host-side, no jax)."""

from lragent_jax.tasks.kb import KBTask, Question, load_role_files
from lragent_jax.tasks.scoring import (EpisodeOutcome, Summary, aggregate, exact_match,
                                       normalize_answer, score_episode, score_episodes)

__all__ = ["KBTask", "Question", "load_role_files", "EpisodeOutcome", "Summary", "aggregate",
           "exact_match", "normalize_answer", "score_episode", "score_episodes"]
