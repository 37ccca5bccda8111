"""The model-backed workflow policy: episodes of a workflow run as rows of one ``Session``."""

from __future__ import annotations

from collections.abc import Sequence

from lragent_jax.session import GenerationSettings, Session, Turn
from lragent_jax.workflow import Segment, TurnOutput, TurnRequest, Workflow, clean_output, run_episodes


class ModelPolicy:
    """A ``workflow.Policy`` that generates with the session's model and adapters.

    Each running episode owns one session row (trajectory); an episode's turns go through the
    session's sharing mode, so the cache decides what each agent prefills. Generation settings other
    than the token limit and stop strings (which come from the workflow) are fixed per policy.
    """

    def __init__(self, session: Session, *, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0):
        self.session = session
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self._rows: dict[int, int] = {}
        self._free = list(range(session.batch))

    def start_episode(self, episode: int, prompt_segments: Sequence[Segment]) -> None:
        if not self._free:
            raise ValueError(f"more concurrent episodes than session rows ({self.session.batch}); "
                             "run episodes in chunks of at most the session's batch")
        row = self._free.pop(0)
        self._rows[episode] = row
        self.session.reset([row])
        for segment in prompt_segments:
            self.session.append_text(row, segment.text)

    def end_episode(self, episode: int) -> None:
        row = self._rows.pop(episode, None)
        if row is not None:
            self._free.append(row)
            self._free.sort()

    def turns(self, requests: Sequence[TurnRequest]) -> list[TurnOutput]:
        turns = {}
        for request in requests:
            if request.episode not in self._rows:
                raise ValueError(f"episode {request.episode} was not started (start_episode)")
            turns[self._rows[request.episode]] = Turn(
                request.agent, append=request.append,
                settings=GenerationSettings(max_new_tokens=request.max_new_tokens,
                                            temperature=self.temperature, top_p=self.top_p,
                                            top_k=self.top_k, stop=tuple(request.stop)))
        results = self.session.turn(turns)
        outputs = []
        for request in requests:
            row = self._rows[request.episode]
            result = results[row]
            cleaned = clean_output(result.text, request.stop)
            if cleaned != result.text:
                # keep the cache in step with the recorded (stripped) segment
                start = len(self.session.tokens[row]) - len(result.token_ids)
                self.session.truncate(row, start)
                self.session.append_text(row, cleaned)
            reason = result.stop_reason if result.stop_reason in ("eos", "stop", "length") else "eos"
            outputs.append(TurnOutput(result.text, reason))
        return outputs


def run_model_episodes(workflow: Workflow, tasks: Sequence, session: Session, *,
                       temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                       progress=None) -> list:
    """Run every task as an episode, ``session.batch`` episodes at a time."""
    policy = ModelPolicy(session, temperature=temperature, top_p=top_p, top_k=top_k)
    records = []
    tasks = list(tasks)
    for offset in range(0, len(tasks), session.batch):
        chunk = tasks[offset:offset + session.batch]
        records.extend(run_episodes(workflow, chunk, policy, first_episode=offset))
        if progress is not None:
            progress(len(records), len(tasks))
    return records
