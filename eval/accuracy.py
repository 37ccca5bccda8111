"""Task accuracy of the multi-agent workflow in each sharing mode."""

from __future__ import annotations

import time
from collections.abc import Sequence

from lragent_jax.agents import run_model_episodes
from lragent_jax.cache import ALL_MODES, ShareMode
from lragent_jax.tasks.scoring import aggregate, score_episode


def run_accuracy(model, task, *, workflow=None, split: str = "test", questions: int = 16,
                 modes: Sequence = ALL_MODES, seeds: Sequence[int] = (0,),
                 temperature: float = 0.0, top_p: float = 1.0, batch: int = 16,
                 capacity: int = 2048, prefill_chunk: int = 512, min_chunk_bucket: int = 64,
                 log=print) -> dict:
    """Run ``questions`` test questions per mode and seed; exact-match accuracy with standard error
    (clustered by question over seeds), per level, share unfinished, and per-mode cost counters.

    With ``temperature == 0`` decoding is greedy and a single seed is enough.
    """
    qs = task.split(split)[:questions]
    workflow = workflow or task.workflow(split)
    results = {"split": split, "questions": len(qs), "seeds": list(seeds),
               "temperature": temperature, "top_p": top_p, "modes": {}}
    episodes_out = {}
    for mode in modes:
        mode = ShareMode.parse(mode).value
        outcomes, prefilled, seconds, records_all = [], {}, 0.0, []
        cache_bytes = None
        for seed in seeds:
            # generous minimum buckets: a handful of compiled turn shapes per mode
            session = model.session(mode, batch=min(batch, max(len(qs), 1)), capacity=capacity,
                                    prefill_chunk=prefill_chunk, seed=seed,
                                    min_chunk_bucket=min_chunk_bucket, min_new_bucket=128)
            t0 = time.perf_counter()
            records = run_model_episodes(workflow, qs, session, temperature=temperature,
                                         top_p=top_p)
            seconds += time.perf_counter() - t0
            for q, record in zip(qs, records):
                outcomes.append(score_episode(record, q.answer, level=q.level, id=q.id))
            for name, n in session.prefill_counts().items():
                prefilled[name] = prefilled.get(name, 0) + n
            cache_bytes = session.cache_bytes()["total"]
            records_all.extend(records)
        summary = aggregate(outcomes).to_dict()
        summary.update(prefilled=prefilled, seconds=seconds, cache_bytes=cache_bytes,
                       outcomes=[o.status for o in outcomes])
        results["modes"][mode] = summary
        episodes_out[mode] = records_all
        log(f"  accuracy {mode}: {summary['accuracy']:.3f} ± {summary['stderr']:.3f} "
            f"(unfinished {summary['unfinished_share']:.2f}, {seconds:.1f}s)")
    return results, episodes_out
