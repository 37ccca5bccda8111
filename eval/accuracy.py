"""Task accuracy of the multi-agent workflow in each sharing mode."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from lragent_jax.agents import ModelPolicy, run_model_episodes
from lragent_jax.cache import ALL_MODES, ShareMode
from lragent_jax.runtime import compile_stats
from lragent_jax.tasks.scoring import aggregate, score_episode


def run_accuracy(model, task, *, workflow=None, split: str = "test", questions: int = 16,
                 modes: Sequence = ALL_MODES, seeds: Sequence[int] = (0,),
                 temperature: float = 0.0, top_p: float = 1.0, batch: int = 16,
                 capacity: int = 2048, prefill_chunk: int | None = None, min_chunk_bucket: int = 64,
                 log=print, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Run ``questions`` test questions per mode and seed; exact-match accuracy with standard error
    (clustered by question over seeds), per level, share unfinished, and per-mode cost counters
    (tokens prefilled per agent, cache bytes, seconds, and the compilations the mode needed).

    With ``temperature == 0`` decoding is greedy and a single seed is enough.
    ``progress(mode, episodes done, episodes of the mode)`` is called after every workflow step.
    """
    qs = task.split(split)[:questions]
    workflow = workflow or task.workflow(split)
    batch = min(batch, max(len(qs), 1))
    results = {"split": split, "questions": len(qs), "seeds": list(seeds),
               "temperature": temperature, "top_p": top_p, "batch": batch,
               "capacity": capacity, "dtype": str(model.dtype), "modes": {}}
    episodes_out = {}
    stats = compile_stats()
    for mode in modes:
        mode = ShareMode.parse(mode).value
        outcomes, prefilled, seconds, records_all, reran = [], {}, 0.0, [], 0
        cache_bytes = None
        compiled_before = stats.snapshot()
        for seed_number, seed in enumerate(seeds):
            on_step = None
            if progress is not None:
                def on_step(done, _, base=seed_number * len(qs), mode=mode):
                    progress(mode, base + done, len(qs) * len(seeds))
            t0 = time.perf_counter()
            records, counts, overflow, cache_bytes = run_episodes_of_mode(
                model, workflow, qs, mode, batch=batch, capacity=capacity,
                prefill_chunk=prefill_chunk, seed=seed, min_chunk_bucket=min_chunk_bucket,
                temperature=temperature, top_p=top_p, progress=on_step)
            if overflow:
                # an episode filled its cache row: run it again with room, so that no answer is
                # cut short by the cache; said in the log and the results
                log(f"  {mode}: {len(overflow)} episode(s) filled the {capacity}-position cache; "
                    f"running them again with {2 * capacity}")
                again, again_counts, still, _ = run_episodes_of_mode(
                    model, workflow, [qs[i] for i in overflow], mode,
                    batch=min(batch, len(overflow)), capacity=2 * capacity,
                    prefill_chunk=prefill_chunk, seed=seed, min_chunk_bucket=min_chunk_bucket,
                    temperature=temperature, top_p=top_p)
                for j, i in enumerate(overflow):
                    records[i], counts[i] = again[j], again_counts[j]
                reran += len(overflow)
                if still:
                    log(f"  {mode}: {len(still)} episode(s) filled {2 * capacity} positions too "
                        "and count as unfinished (--capacity)")
            seconds += time.perf_counter() - t0
            for q, record in zip(qs, records):
                outcomes.append(score_episode(record, q.answer, level=q.level, id=q.id))
            for episode_counts in counts:
                for name, n in episode_counts.items():
                    prefilled[name] = prefilled.get(name, 0) + n
            records_all.extend(records)
        summary = aggregate(outcomes).to_dict()
        summary.update(prefilled=prefilled, seconds=seconds, cache_bytes=cache_bytes,
                       cache_bytes_per_trajectory=cache_bytes / batch,
                       rerun_with_more_capacity=reran,
                       compilation=stats.since(compiled_before),
                       outcomes=[o.status for o in outcomes])
        results["modes"][mode] = summary
        episodes_out[mode] = records_all
        compiled = summary["compilation"]
        log(f"  accuracy {mode}: {summary['accuracy']:.3f} ± {summary['stderr']:.3f} "
            f"(unfinished {summary['unfinished_share']:.2f}, {seconds:.1f}s, of which "
            f"{compiled['compile_seconds']:.1f}s compiling {compiled['compiles']} programs)")
    return results, episodes_out


def run_episodes_of_mode(model, workflow, questions, mode, *, batch, capacity, prefill_chunk,
                         seed, min_chunk_bucket, temperature, top_p, progress=None):
    """Episodes of ``questions`` in one session of ``mode``: (records, tokens each agent prefilled
    per episode, indices of the episodes that filled their cache row, cache bytes)."""
    # generous minimum buckets: a handful of compiled turn shapes per mode
    session = model.session(mode, batch=batch, capacity=capacity, prefill_chunk=prefill_chunk,
                            seed=seed, min_chunk_bucket=min_chunk_bucket, min_new_bucket=128)
    policy = ModelPolicy(session, temperature=temperature, top_p=top_p)
    records = run_model_episodes(workflow, questions, session, progress=progress, policy=policy)
    counts = [policy.episode_prefilled[i] for i in range(len(questions))]
    return records, counts, sorted(policy.out_of_capacity), session.cache_bytes()["total"]
