"""Built-in tasks for the agents, and scoring of their episodes (host-side, no jax)."""

from lragent_jax.tasks.kb import KBTask, Question
from lragent_jax.tasks.scienceqa import (PublishedCorpus, ScienceQAWorkflow, ScienceQuestion,
                                        load_eval_questions, load_role_files)
from lragent_jax.tasks.scoring import (EpisodeOutcome, Summary, aggregate, exact_match,
                                       normalize_answer, score_episode, score_episodes)

__all__ = ["KBTask", "Question", "load_role_files", "PublishedCorpus", "ScienceQAWorkflow",
           "ScienceQuestion", "load_eval_questions", "EpisodeOutcome", "Summary", "aggregate",
           "exact_match", "normalize_answer", "score_episode", "score_episodes"]
