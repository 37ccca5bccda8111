"""Many-episode throughput of the cache-sharing modes through the continuous rollout engine.

    python -m eval.throughput --workloads traces --trace-model llama3_1_8b \\
        --lengths 8192,16384,32768 --episodes 64 --rows same:16,max
    python -m eval.throughput --workloads kb --kb-episodes 256 --rows same:64,max
    python -m eval.throughput --quick            # tiny model, both workloads, a CPU in about a minute

Workloads:
- ``traces``: ReAct-shaped turn traces (``eval.traces.generate_trace``, one seed per episode) of each
  length, replayed on random weights of a preset shape with random plan / action / reflect
  adapters: every turn appends random tokens and generates exactly its count, the first token in
  a call of its own (its time to first token). Default shape: llama3_1_8b on a GPU, tiny on a CPU.
- ``kb``: the built-in task (``KBTask`` test split, ``ReActWorkflow``, greedy) on the embedded
  SmolLM2-135M-Instruct with the shipped adapters, scored as the accuracy part scores it. A turn
  returns all its tokens at the end of one call, so its time to first token is its latency.

Row counts (``--rows``): ``same:N`` runs every mode with N rows; ``max`` runs each mode with the
largest row count that fits the memory budget (``lragent_jax.rollout.plan_rows``: analytic cache
bytes plus an activation allowance; ``--budget-gib``, default what the device has free after the
weights, 2 GiB on a CPU), at most the episode count.

A ``same:N`` run that does not fit the budget (without headroom) is skipped and reported. Each
(workload, length, mode, rows) first runs ``--warmup`` episodes untimed (compilation), then
times the episodes. Reported: episodes/s, generated tokens/s, prefilled tokens per agent, time to
first token p50 / p99 and turn latency p50 over all turns, calls and rows per call, the share of
computed prefill positions that were real tokens, compile seconds that still fell in the timed
window, analytic cache bytes, device memory; JSON with device, versions, date and command; a plot
of episodes/s per mode against context length.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from eval.common import NullTokenizer, csv_list, environment, print_table, write_json
from eval.traces import Trace, generate_trace
from lragent_jax.cache import ALL_MODES, ShareMode
from lragent_jax.config import ADAPTER_TARGETS, LoraConfig, ModelConfig
from lragent_jax.rollout import (ProgressBar, RolloutEngine, Schedule, TraceEpisode,
                                 device_free_bytes, plan_rows, run_traces)
from lragent_jax.session import Session

WORKLOADS = ("traces", "kb")
ROLES = ("plan", "action", "reflect")
CPU_BUDGET_GIB = 2.0
COMPILE_EVENT = "/jax/core/compile/"


# ----------------------------------------------------------------------------- measuring


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling while ``running`` is set."""

    def __init__(self):
        self.seconds, self.running = 0.0, False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name, duration, **_):
        if self.running and name.startswith(COMPILE_EVENT):
            self.seconds += duration


_CLOCK: CompileClock | None = None


def _compile_clock() -> CompileClock:
    global _CLOCK
    if _CLOCK is None:
        _CLOCK = CompileClock()
    return _CLOCK


def _device_memory() -> dict:
    stats = jax.local_devices()[0].memory_stats() or {}
    return {f"device_{k}": stats[k] for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


def _calls_by_bucket(calls) -> dict:
    """Per padded prefill length: calls, seconds, mean rows and mean generated tokens per call."""
    out: dict[int, dict] = {}
    for c in calls:
        entry = out.setdefault(c.chunk_bucket, {"calls": 0, "seconds": 0.0, "rows": 0,
                                                "generated": 0})
        entry["calls"] += 1
        entry["seconds"] += c.seconds
        entry["rows"] += c.rows
        entry["generated"] += c.generated
    return {str(k): {**v, "rows": v["rows"] / v["calls"]} for k, v in sorted(out.items())}


def calls_by_shape(calls) -> dict:
    """Per call shape ``"<rows>x<padded prefill length>"``: calls and seconds (the same keys as
    the server's ``lragent_engine_calls_by_shape_total``)."""
    out: dict[tuple, dict] = {}
    for c in calls:
        entry = out.setdefault((c.rows, c.chunk_bucket), {"calls": 0, "seconds": 0.0})
        entry["calls"] += 1
        entry["seconds"] += c.seconds
    return {f"{r}x{b}": v for (r, b), v in sorted(out.items())}


def call_summary(calls: list[dict], long_prefill: int = 512) -> dict:
    """How a run's calls were made up (``CallStats`` as dicts, or a server's ``--call-log``
    lines): decode steps in all (a call decodes until its last row is done), the calls carrying a
    chunk over ``long_prefill`` tokens (the schedule's long turns), those chunks, and the seconds
    of those calls and of the rest."""
    long = [c for c in calls if c["chunk_max"] > long_prefill]
    long_s = sum(c["seconds"] for c in long)
    return {"decode_steps": sum(c["decode_steps"] for c in calls), "long_calls": len(long),
            "long_chunks": sum(n > long_prefill for c in calls for n in c["chunks"]),
            "long_call_s": long_s, "other_call_s": sum(c["seconds"] for c in calls) - long_s}


def _percentile(values, q):
    return float(np.percentile(values, q)) if len(values) else None


def measure(session: Session, make_episodes, *, episodes: int, warmup: int,
            schedule: Schedule, label: str, progress: bool = True, score=None,
            keep_calls: bool = False) -> dict:
    """Run ``warmup`` then ``episodes`` episodes of ``make_episodes(start, count)`` through one
    engine on ``session``; the measurements of the timed run. ``score(results)`` adds fields (the
    task's accuracy); ``keep_calls`` adds ``call_log``, one dict per call (``CallStats``)."""
    if warmup:
        list(RolloutEngine(session, schedule=schedule).run(make_episodes(10_000, warmup)))
    clock = _compile_clock()
    bar = ProgressBar(episodes, label=label) if progress else None
    engine = RolloutEngine(session, schedule=schedule, progress=bar, record_calls=True)
    clock.seconds, clock.running = 0.0, True
    t0 = time.perf_counter()
    try:
        results = list(engine.run(make_episodes(0, episodes), total=episodes))
    finally:
        clock.running = False
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    ttft = [t for r in ok for t in r.ttft_s]
    turn = [t for r in ok for t in r.turn_s]
    prefilled = {a: sum(r.prefilled.get(a, 0) for r in results) for a in session.agent_names}
    generated = sum(r.generated for r in results)
    batcher = engine.batcher
    log = [dataclasses.asdict(c) for c in batcher.calls]
    row = {
        "rows": session.batch, "capacity": session.capacity, "episodes": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "seconds": seconds, "episodes_s": len(results) / seconds, "generated": generated,
        "gen_tok_s": generated / seconds, "prefilled": prefilled,
        "prefilled_total": sum(prefilled.values()),
        "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99),
        "turn_p50_s": _percentile(turn, 50), "turns": len(ttft),
        "calls": batcher.num_calls,
        "rows_per_call": sum(r.calls for r in results) / max(batcher.num_calls, 1),
        "prefill_efficiency": (sum(prefilled.values()) / batcher.padded_prefill
                               if batcher.padded_prefill else None),
        "compile_s_in_timed": clock.seconds,
        # an estimate for runs whose warm-up did not reach every shape: the engine thread does
        # nothing else while it compiles, so those seconds are taken out of the wall time
        "episodes_s_ex_compile": len(results) / max(seconds - clock.seconds, 1e-9),
        "calls_by_bucket": _calls_by_bucket(batcher.calls),
        "calls_by_shape": calls_by_shape(batcher.calls),
        "call_summary": call_summary(log),
        "cache_bytes": session.analytic_cache_bytes()["total"],
        **_device_memory(),
    }
    if score is not None:
        row.update(score(results))
    if keep_calls:
        row["call_log"] = log
    return row


# ----------------------------------------------------------------------------- trace replay


def replay_with_engine(session: Session, trace: Trace, rng: np.random.Generator) -> dict:
    """``eval.efficiency.replay`` through the rollout engine: ``trace`` on one row of ``session``
    (random tokens drawn from ``rng``), each turn's first token in a call of its own. Returns the
    same keys: ``e2e_s``, ``ttft_s`` and ``turn_s`` per turn, ``prefilled`` per agent."""
    return replay_many(session, [trace], seed=int(rng.integers(2 ** 31)))[0]


def replay_many(session: Session, traces, *, seed: int = 0,
                schedule: Schedule | None = None) -> list[dict]:
    """Replay ``traces`` together over the session's rows (continuous batching); per trace the
    keys of ``replay_with_engine``. Raises if a trace fails (e.g. longer than the rows)."""
    out = []
    for result in run_traces(traces, session, seed=seed, schedule=schedule):
        if not result.ok:
            raise RuntimeError(f"trace {result.task.name!r} failed: {result.error}")
        out.append({"e2e_s": result.finished_s - result.started_s, "ttft_s": list(result.ttft_s),
                    "turn_s": list(result.turn_s), "prefilled": dict(result.prefilled)})
    return out


def random_model(config: ModelConfig, *, rank: int = 8, targets=("q", "v"), dtype=jnp.bfloat16,
                 seed: int = 0):
    """Random weights of ``config``'s shape without EOS ids, and random plan / action / reflect
    adapters (as the efficiency benchmark builds them); the weights in the inference layout with
    the adapters' A appended, one copy shared by every session."""
    from lragent_jax.inference import fuse_adapters, to_inference_params
    from lragent_jax.lora import init_adapters
    from lragent_jax.model import init_params

    config = config.replace(eos_token_ids=())
    params = to_inference_params(
        jax.jit(init_params, static_argnums=(1, 2))(jax.random.key(seed), config, dtype), config,
        donate=True)
    lora = LoraConfig(rank=rank, targets=tuple(targets), agents=ROLES)
    adapters = init_adapters(jax.random.key(seed + 1), config, lora, dtype=dtype, b_scale=0.02)
    params = fuse_adapters(params, config, adapters, lora, donate=True)
    return config, params, lora, adapters


def trace_capacity(length: int) -> int:
    return -(-(length + 64) // 256) * 256


def run_traces_workload(opts, modes, log=print) -> list[dict]:
    config = _trace_config(opts.trace_model)
    dtype = jnp.dtype(opts.dtype)
    config, params, lora, adapters = random_model(config, rank=opts.rank, targets=opts.targets,
                                                  dtype=dtype, seed=opts.seed)
    budget = _budget_bytes(opts)
    schedule = _schedule(opts)
    rows_out = []
    for length in opts.lengths:
        capacity = trace_capacity(length)

        def make(start, count, length=length):
            return (TraceEpisode(generate_trace(length, opts.seed + start + i),
                                 seed=opts.seed + start + i) for i in range(count))

        for rule, mode in [(rule, m) for rule in opts.rows for m in modes]:
            rows, plan, skip = _rows_for(rule, config, mode, capacity, lora, dtype, budget,
                                         opts.prefill_chunk, opts.episodes)
            row = {"workload": "traces", "model": config.name, "length": length, "mode": mode,
                   "rows_rule": rule if rule == "max" else "same",
                   "budget": plan.describe() if plan else None}
            if skip is not None:
                rows_out.append(_skipped(row, rows, skip, log))
                continue
            session = Session(config, params, NullTokenizer(), adapters=adapters, lora=lora,
                              mode=mode, batch=rows, capacity=capacity, attn_impl=opts.attn,
                              prefill_chunk=opts.prefill_chunk, seed=opts.seed,
                              min_chunk_bucket=min(opts.min_chunk_bucket, capacity),
                              min_new_bucket=64, long_lane=opts.long_lane)
            row.update(measure(session, make, episodes=opts.episodes,
                               warmup=min(opts.warmup, opts.episodes), schedule=schedule,
                               label=f"{config.name} {length} {mode} x{rows}",
                               progress=not opts.no_progress))
            rows_out.append(row)
            log(_line(row))
            del session
            gc.collect()
            if opts.on_row is not None:
                opts.on_row(rows_out)
    return rows_out


# ----------------------------------------------------------------------------- built-in task


def run_kb_workload(opts, modes, log=print) -> list[dict]:
    from eval.common import load_eval_model as _load_model
    from lragent_jax.tasks.kb import KBTask
    from lragent_jax.tasks.scoring import aggregate, score_episode
    from lragent_jax.workflow import ReActWorkflow

    model = _load_model(argparse.Namespace(model=opts.kb_model, adapters=opts.kb_adapters,
                                           dtype=opts.kb_dtype, attn=opts.attn))
    task = KBTask(seed=opts.task_seed, num_train=0, num_valid=1, num_test=opts.kb_episodes)
    workflow = ReActWorkflow(task.tools("test"), templates=task.templates,
                             max_steps=opts.max_steps)
    questions = task.split("test")[:opts.kb_episodes]
    budget = _budget_bytes(opts)
    schedule = _schedule(opts)
    dtype = jnp.dtype(opts.kb_dtype)

    def make(start, count):
        from lragent_jax.rollout import WorkflowEpisode

        # warm-up runs the first questions; the timed run all of them
        return (WorkflowEpisode(workflow, q) for q in questions[:count])

    def score(results):
        outcomes = [score_episode(r.record, r.task.answer, level=r.task.level, id=r.task.id)
                    for r in results if r.record is not None]
        summary = aggregate(outcomes).to_dict()
        return {"accuracy": summary["accuracy"], "stderr": summary["stderr"],
                "unfinished_share": summary["unfinished_share"],
                "mean_tokens": float(np.mean([len(model.tokenizer.encode(r.record.text))
                                              for r in results if r.record is not None]))}

    rows_out = []
    for rule, mode in [(rule, m) for rule in opts.rows for m in modes]:
        rows, plan, skip = _rows_for(rule, model.config, mode, opts.kb_capacity, model.lora,
                                     dtype, budget, opts.kb_prefill_chunk, len(questions))
        row = {"workload": "kb", "model": model.config.name, "length": None, "mode": mode,
               "rows_rule": rule if rule == "max" else "same",
               "budget": plan.describe() if plan else None}
        if skip is not None:
            rows_out.append(_skipped(row, rows, skip, log))
            continue
        session = model.session(mode, batch=rows, capacity=opts.kb_capacity,
                                prefill_chunk=opts.kb_prefill_chunk,
                                min_chunk_bucket=opts.kb_min_bucket, min_new_bucket=128,
                                long_lane=opts.long_lane)
        row.update(measure(session, make, episodes=len(questions),
                           warmup=min(opts.warmup, len(questions)), schedule=schedule,
                           label=f"kb {mode} x{rows}", progress=not opts.no_progress, score=score))
        rows_out.append(row)
        log(_line(row) + f", accuracy {row['accuracy']:.3f}")
        del session
        gc.collect()
        if opts.on_row is not None:
            opts.on_row(rows_out)
    return rows_out


# ----------------------------------------------------------------------------- shared pieces


def _trace_config(name: str) -> ModelConfig:
    if name == "tiny":
        from eval.common import tiny_config

        return tiny_config()
    return ModelConfig.preset(name)


def _budget_bytes(opts) -> tuple[int, str]:
    """The budget every mode's ``max`` row count is planned in, and where it comes from:
    --budget-gib, else what the device has free now (call it once the weights are on the device),
    else (a CPU) 2 GiB."""
    if opts.budget_gib is not None:
        return int(opts.budget_gib * (1 << 30)), "--budget-gib"
    free = device_free_bytes()
    if free is not None:
        return free, "device free memory after the weights"
    return int(CPU_BUDGET_GIB * (1 << 30)), "CPU default"


def _schedule(opts) -> Schedule:
    return Schedule(long_prefill=None if opts.long_prefill == 0 else opts.long_prefill,
                    long_fill=opts.long_fill)


def _rows_for(rule, config, mode, capacity, lora, dtype, budget, prefill_chunk, episodes):
    """(rows, plan or None, why the run is skipped or None) for a row rule: ``max`` plans the rows
    in the budget; ``same:N`` is skipped when N rows do not fit it even with no headroom."""
    common = dict(capacity=capacity, lora=lora, cache_dtype=dtype, budget_bytes=budget[0],
                  budget_source=budget[1], prefill_chunk=prefill_chunk)
    try:
        if rule == "max":
            plan = plan_rows(config, mode, max_rows=episodes, **common)
            print(f"  {plan.describe()}", flush=True)
            return plan.rows, plan, None
        fits = plan_rows(config, mode, headroom=0.0, **common)
    except ValueError as e:
        return 0, None, str(e)
    if int(rule) > fits.rows:
        return int(rule), None, (f"{rule} rows of mode {mode} do not fit: {fits.describe()} "
                                 "(no headroom)")
    return int(rule), None, None


def _skipped(row: dict, rows: int, reason: str, log) -> dict:
    log(f"  skipped {row['mode']} ({row['rows_rule']} rows): {reason}")
    return {**row, "rows": rows, "skipped": reason}


def _line(row) -> str:
    return (f"  {row['workload']} {row['model']} {row['length'] or ''} {row['mode']} "
            f"x{row['rows']}: {row['episodes_s']:.3f} episodes/s, {row['gen_tok_s']:.0f} gen tok/s, "
            f"prefilled {row['prefilled_total']}, TTFT p50 {row['ttft_p50_s'] or 0:.3f}s, "
            f"{row['failed']} failed")


def summarize(rows: list[dict]) -> list[dict]:
    """Per (workload, model, length, rows rule): base_lowrank_shared's episodes/s over the others'."""
    out = []
    rows = [r for r in rows if "skipped" not in r]
    keys = sorted({(r["workload"], r["model"], r["length"] or 0, r["rows_rule"]) for r in rows},
                  key=str)
    for key in keys:
        group = {r["mode"]: r for r in rows
                 if (r["workload"], r["model"], r["length"] or 0, r["rows_rule"]) == key}
        summary = {"workload": key[0], "model": key[1], "length": key[2] or None,
                   "rows_rule": key[3],
                   "rows": {m: r["rows"] for m, r in group.items()}}
        lr = group.get("base_lowrank_shared")
        if lr:
            for other in ("non_shared", "fully_shared", "base_shared"):
                if other in group and group[other]["episodes_s"] > 0:
                    summary[f"lr_vs_{other}"] = lr["episodes_s"] / group[other]["episodes_s"]
        out.append(summary)
    return out


def plot_episodes_per_s(rows: list[dict], path: Path) -> Path:
    """Episodes/s per mode against context length (trace workload): solid lines at the same row
    count, dashed at each mode's largest row count in the budget. Several runs of one (mode, rows
    rule, length), e.g. merged files, are drawn as their mean."""
    from eval import plots

    fig, ax = plots.plt.subplots(figsize=(6, 4))
    traces = [r for r in rows if r["workload"] == "traces" and "skipped" not in r]
    for rule, style in (("same", "-"), ("max", "--")):
        for mode in plots._modes({r["mode"] for r in traces}):
            runs: dict[int, list] = {}
            for r in traces:
                if r["mode"] == mode and r["rows_rule"] == rule:
                    runs.setdefault(r["length"], []).append(r)
            pts = [(length, float(np.mean([r["episodes_s"] for r in rs])),
                    "|".join(sorted({str(r["rows"]) for r in rs})))
                   for length, rs in sorted(runs.items())]
            if pts:
                rows_note = "/".join(str(p[2]) for p in pts)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle=style,
                        color=plots.COLORS[mode], label=f"{mode} ({rule} rows: {rows_note})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("episode length (tokens)")
    ax.set_ylabel("episodes / s")
    ax.set_title("Many-episode throughput (continuous batching)")
    ax.grid(alpha=0.3)
    return plots._save(fig, ax, path)


# ----------------------------------------------------------------------------- command line


def _rows_arg(text):
    rules = []
    for item in text.split(","):
        if item == "max":
            rules.append("max")
        elif item.startswith("same:") and item[5:].isdigit() and int(item[5:]) >= 1:
            rules.append(item[5:])
        else:
            raise argparse.ArgumentTypeError(f"--rows items are 'same:N' (N >= 1) or 'max'; got "
                                             f"{item!r}")
    return rules


def build_parser() -> argparse.ArgumentParser:
    on_cpu = jax.default_backend() == "cpu"
    p = argparse.ArgumentParser(prog="python -m eval.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", type=csv_list(str), default=["traces"],
                   help=f"comma-separated from {', '.join(WORKLOADS)} (default traces)")
    p.add_argument("--modes", type=csv_list(str), default=[m.value for m in ALL_MODES])
    p.add_argument("--rows", type=_rows_arg, default=["16", "max"],
                   help="row-count rules: same:N (every mode N rows) and/or max (the most each "
                        "mode fits in the budget); default same:16,max")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="device-memory budget for --rows max (default: what the device has free "
                        "after the weights, within JAX's pool: XLA_PYTHON_CLIENT_MEM_FRACTION, 75%% "
                        f"of a GPU unless set; {CPU_BUDGET_GIB:g} GiB on a CPU)")
    p.add_argument("--warmup", type=int, default=4,
                   help="untimed episodes before each timed run (compilation; default 4)")
    p.add_argument("--long-prefill", type=int, default=512,
                   help="schedule: turns prefilling more tokens wait to run together (0: never "
                        "hold back; default 512)")
    p.add_argument("--long-fill", type=float, default=0.5,
                   help="schedule: share of a long call's padded prefill (rows x padded length) "
                        "that real tokens must fill (default 0.5)")
    p.add_argument("--attn", default=None, help="attention implementation (default: platform's)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("traces workload (random weights)")
    g.add_argument("--trace-model", default="tiny" if on_cpu else "llama3_1_8b",
                   help="model preset or 'tiny' (default: llama3_1_8b on a GPU, tiny on a CPU)")
    g.add_argument("--lengths", type=csv_list(int), default=[256, 512] if on_cpu
                   else [8192, 16384, 32768], help="episode lengths in tokens")
    g.add_argument("--episodes", type=int, default=4 if on_cpu else 64,
                   help="timed episodes per length, mode and row count")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--targets", type=csv_list(str), default=["q", "v"],
                   help=f"adapter targets from {ADAPTER_TARGETS}")
    g.add_argument("--dtype", choices=("bfloat16", "float32"),
                   default="float32" if on_cpu else "bfloat16")
    g.add_argument("--prefill-chunk", type=int, default=2048)
    g.add_argument("--min-chunk-bucket", type=int, default=64,
                   help="smallest padded prefill length (fewer compiled shapes when larger)")
    g.add_argument("--long-lane", action=argparse.BooleanOptionalAction, default=None,
                   help="the long-prefill lane, both workloads (Session's long_lane; default: "
                        "on when the prefill chunk is above the smallest bucket)")
    g = p.add_argument_group("kb workload (built-in task)")
    g.add_argument("--kb-model", default=None,
                   help="a .gguf file or HF folder (default: the embedded SmolLM2-135M-Instruct), "
                        "or 'tiny'")
    g.add_argument("--kb-adapters", default=None,
                   help="role adapters (default: the shipped ones; 'random' for untrained)")
    g.add_argument("--kb-episodes", type=int, default=4 if on_cpu else 256,
                   help="test questions per mode and row count (default 256 on a GPU)")
    g.add_argument("--kb-dtype", choices=("bfloat16", "float32"), default="float32",
                   help="parameter dtype (default float32, as the accuracy part)")
    g.add_argument("--kb-capacity", type=int, default=2048)
    g.add_argument("--kb-prefill-chunk", type=int, default=512)
    g.add_argument("--kb-min-bucket", type=int, default=64)
    g.add_argument("--task-seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="instead of running: merge the rows of these results files (e.g. one run "
                        "per mode) into --out, with the summary, tables and plot")
    p.add_argument("--quick", action="store_true",
                   help="both workloads at smoke-test size on a tiny random model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", default="results/throughput.json")
    return p


def apply_quick(opts) -> None:
    opts.workloads = list(WORKLOADS)
    opts.trace_model, opts.lengths, opts.episodes, opts.warmup = "tiny", [256], 3, 1
    opts.kb_model, opts.kb_adapters, opts.kb_episodes, opts.kb_capacity = "tiny", "random", 3, 1024
    opts.kb_min_bucket, opts.max_steps, opts.dtype = 256, 2, "float32"
    opts.rows = ["2", "max"]
    opts.budget_gib = opts.budget_gib or 0.25


def check(opts, parser) -> list[str]:
    unknown = [w for w in opts.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; allowed: {', '.join(WORKLOADS)}")
    try:
        modes = [ShareMode.parse(m).value for m in opts.modes]
    except ValueError as e:
        parser.error(str(e))
    for name in ("episodes", "kb_episodes", "kb_capacity", "rank"):
        if getattr(opts, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(opts, name)}")
    if opts.warmup < 0 or opts.long_prefill < 0:
        parser.error("--warmup and --long-prefill must be >= 0")
    if opts.budget_gib is not None and opts.budget_gib <= 0:
        parser.error(f"--budget-gib must be > 0; got {opts.budget_gib}")
    short = [n for n in opts.lengths if n < 256]
    if short:
        parser.error(f"--lengths must be >= 256 tokens; got {short}")
    return modes


def _print_tables(rows, summary, env) -> None:
    print_table(rows, ["workload", "model", "length", "mode", "rows", "episodes_s", "gen_tok_s",
                       "prefilled_total", "ttft_p50_s", "ttft_p99_s", "rows_per_call",
                       "prefill_efficiency", "accuracy", "compile_s_in_timed",
                       "episodes_s_ex_compile", "failed"],
                title=f"throughput on {env['device']} (jax {env['jax']}, {env['date']})")
    print_table(summary, ["workload", "model", "length", "rows_rule", "lr_vs_non_shared",
                          "lr_vs_fully_shared", "lr_vs_base_shared"],
                title="base_lowrank_shared episodes/s over the other modes (>1: faster)")


def merge(paths, out_path: Path, plot: bool = True) -> dict:
    """One results file from several (e.g. one run per mode, each within a time limit)."""
    import json

    payloads = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--merge: no such file: {path}")
        try:
            payloads.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"--merge: {path} is not valid JSON ({e})") from None
        if "rows" not in payloads[-1]:
            raise ValueError(f"--merge: {path} holds no throughput rows")
    rows = [r for p in payloads for r in p["rows"]]
    payload = {"environment": payloads[0].get("environment", {}),
               "merged_from": [{"file": str(f), "environment": p.get("environment"),
                                "partial": p.get("partial")} for f, p in zip(paths, payloads)],
               "rows": rows, "summary": summarize(rows),
               "partial": any(p.get("partial") for p in payloads)}
    if plot and any(r["workload"] == "traces" for r in rows):
        payload["plot"] = str(plot_episodes_per_s(rows, out_path.with_suffix(".png")))
    write_json(out_path, payload)
    _print_tables(rows, payload["summary"], {"device": "-", "jax": "-", "date": "-",
                                             **payload["environment"]})
    return payload


def run(opts, modes, out_path: Path, log=print) -> dict:
    """Every workload of ``opts``; writes ``out_path`` (partial results after every row) and the
    plot beside it. Returns the payload."""
    env = environment()
    payload = {"environment": env, "args": {k: v for k, v in vars(opts).items() if k != "on_row"},
               "rows": [], "summary": [], "partial": True}
    done: list[dict] = []

    def save(rows, partial=True):
        payload.update(rows=done + rows, summary=summarize(done + rows), partial=partial)
        write_json(out_path, payload)

    opts.on_row = save
    for workload in opts.workloads:
        log(f"\n== throughput: {workload} workload, rows {opts.rows}, modes {modes}")
        runner = run_traces_workload if workload == "traces" else run_kb_workload
        done += runner(opts, modes, log=log)
        save([])
    payload["partial"] = False
    if not opts.no_plots and any(r["workload"] == "traces" for r in done):
        payload["plot"] = str(plot_episodes_per_s(done, out_path.with_suffix(".png")))
    write_json(out_path, payload)
    _print_tables(done, payload["summary"], env)
    return payload


def run_part(args, modes, out_dir: Path) -> dict:
    """The ``throughput`` part of ``python -m eval``: both workloads, with that command's model,
    adapters, dtype, attention, ``--lengths`` (traces), ``--questions`` (kb episodes), ``--batch``
    (the same-rows count, beside ``max``), ``--capacity``, ``--min-bucket`` and output folder."""
    opts = build_parser().parse_args([])
    opts.workloads = list(WORKLOADS)
    opts.kb_model, opts.kb_adapters, opts.kb_dtype = args.model, args.adapters, args.dtype
    opts.attn, opts.task_seed, opts.max_steps = args.attn, args.task_seed, args.max_steps
    opts.lengths, opts.kb_episodes, opts.rows = list(args.lengths), args.questions, [
        str(args.batch), "max"]
    opts.kb_capacity, opts.kb_min_bucket, opts.no_plots = args.capacity, args.min_bucket, \
        args.no_plots
    if args.model == "tiny":
        opts.trace_model = "tiny"
    payload = run(opts, modes, Path(out_dir) / "throughput.json")
    return {"rows": payload["rows"], "summary": payload["summary"]}


def main(argv=None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.merge:
        try:
            payload = merge(opts.merge, Path(opts.out), plot=not opts.no_plots)
        except ValueError as e:
            parser.error(str(e))
        print(f"wrote {opts.out}" + (f" and {payload['plot']}" if "plot" in payload else ""))
        return 0
    if opts.quick:
        apply_quick(opts)
    modes = check(opts, parser)
    payload = run(opts, modes, Path(opts.out))
    print(f"wrote {opts.out}" + (f" and {payload['plot']}" if "plot" in payload else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
