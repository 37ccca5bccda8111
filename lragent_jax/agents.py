"""The model-backed workflow policy: episodes of a workflow run as rows of one ``Session``."""

from __future__ import annotations

from collections.abc import Sequence

from lragent_jax.session import GenerationSettings, Session, Turn, TurnResult
from lragent_jax.workflow import Segment, TurnOutput, TurnRequest, Workflow, clean_output, run_episodes

def prepare_turn(session: Session, row: int, request: TurnRequest, **sampling) -> Turn | None:
    """The session turn for a workflow request on ``row``, or None when the row has no room left
    (the agent then says nothing). ``sampling``: GenerationSettings fields (temperature, ...)."""
    append = session.tokenizer.encode(request.append) if request.append else []
    room = session.capacity - len(session.tokens[row]) - len(append) + 1
    if room < 1:
        return None
    return Turn(request.agent, append_ids=tuple(append),
                settings=GenerationSettings(max_new_tokens=min(request.max_new_tokens, room),
                                            stop=tuple(request.stop), **sampling))


def finish_turn(session: Session, row: int, request: TurnRequest,
                result: TurnResult | None) -> TurnOutput:
    """The workflow's output for a turn's result (None: no turn ran), with the row's trajectory cut
    back to the recorded (cleaned) segment."""
    if result is None:
        return TurnOutput("", "length")
    cleaned = clean_output(result.text, request.stop)
    if cleaned != result.text:
        # keep the trajectory in step with the recorded (stripped) segment
        start = len(session.tokens[row]) - len(result.token_ids)
        session.truncate(row, start)
        session.append_tokens(row, _segment_tokens(session, result.token_ids, cleaned, row))
    reason = result.stop_reason if result.stop_reason in ("eos", "stop", "length") else "eos"
    return TurnOutput(result.text, reason)


def _segment_tokens(session: Session, generated: list[int], cleaned: str, row: int) -> list[int]:
    """Tokens for the cleaned segment: the generated ones minus whitespace-only tokens at either end
    when they decode to it exactly, else the cleaned text tokenized (clipped to the row's remaining
    capacity)."""
    decode = session.tokenizer.decode
    i, j = 0, len(generated)
    while i < j and not decode(generated[i:i + 1]).strip():
        i += 1
    while j > i and not decode(generated[j - 1:j]).strip():
        j -= 1
    if decode(generated[i:j]) == cleaned:
        return list(generated[i:j])
    ids = session.tokenizer.encode(cleaned) if cleaned else []
    return ids[:session.capacity - len(session.tokens[row])]


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
        self.out_of_capacity: set[int] = set()  # episodes that filled their cache row
        # tokens each agent prefilled per finished episode (the session's counters restart with
        # every episode a row takes on, so they alone would count only the last ones)
        self.episode_prefilled: dict[int, dict[str, int]] = {}

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
            self.episode_prefilled[episode] = {
                name: int(n) for name, n in zip(self.session.agent_names,
                                                self.session.prefilled[row])}
            self._free.append(row)
            self._free.sort()

    def turns(self, requests: Sequence[TurnRequest]) -> list[TurnOutput]:
        turns = {}
        for request in requests:
            if request.episode not in self._rows:
                raise ValueError(f"episode {request.episode} was not started (start_episode)")
            row = self._rows[request.episode]
            turn = prepare_turn(self.session, row, request, temperature=self.temperature,
                                top_p=self.top_p, top_k=self.top_k)
            if turn is None:
                # out of cache capacity: the agent says nothing and the episode runs out of steps
                self.out_of_capacity.add(request.episode)
                continue
            turns[row] = turn
        results = self.session.turn(turns)
        return [finish_turn(self.session, self._rows[r.episode], r,
                            results.get(self._rows[r.episode])) for r in requests]


def run_model_episodes(workflow: Workflow, tasks: Sequence, session: Session, *,
                       temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                       progress=None, policy: ModelPolicy | None = None) -> list:
    """Run every task as an episode, ``session.batch`` episodes at a time (for continuous batching
    over the rows, see ``lragent_jax.rollout``).

    ``progress(done, total)`` is called after every workflow step with the episodes finished so far.
    ``policy``: a ``ModelPolicy`` over ``session`` to use (and read afterwards: per-episode prefill
    counts, episodes out of capacity); by default a new one with the sampling settings given.
    """
    if policy is None:
        policy = ModelPolicy(session, temperature=temperature, top_p=top_p, top_k=top_k)
    elif policy.session is not session:
        raise ValueError("policy must run on the session given")
    records = []
    tasks = list(tasks)
    for offset in range(0, len(tasks), session.batch):
        chunk = tasks[offset:offset + session.batch]
        step_progress = None
        if progress is not None:
            def step_progress(done, _, offset=offset):
                progress(offset + done, len(tasks))
        records.extend(run_episodes(workflow, chunk, policy, first_episode=offset,
                                    progress=step_progress))
    return records
