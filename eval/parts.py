"""The parts of ``python -m eval``: a table from part name to the function that runs it.

A part is a function ``run(ctx) -> dict`` registered with ``@part``: it reads its options from
``ctx.args``, the model from ``ctx.model`` (loaded on first use, so parts without a model never load
one), prints its own tables, and returns its entry of ``results.json``. Parts run in the order they
are registered. A new part is a few lines:

    def _throughput_options(group):
        group.add_argument("--tp-batch", type=int, default=8, help="...")

    @part("throughput", help="requests per second of ...", options=_throughput_options,
          quick={"tp_batch": 2})
    def throughput(ctx):
        from eval.throughput import run
        return run(ctx)

``quick`` holds the option values ``--quick`` uses for that part (options the user gave win).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from eval.common import csv_list, print_table, write_json
from lragent_jax.cache import ALL_MODES, analytic_cache_bytes
from lragent_jax.config import ModelConfig
from lragent_jax.runtime import Progress, compile_stats, format_seconds


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    run: Callable[["RunContext"], dict]
    help: str
    default: bool = False  # part of the main job (no --parts)
    in_quick: bool = True  # part of --quick
    options: Callable[[argparse._ArgumentGroup], None] | None = None
    quick: dict = dataclasses.field(default_factory=dict)  # option values under --quick


PARTS: dict[str, Part] = {}


def part(name: str, *, help: str, default: bool = False, in_quick: bool = True, options=None,
         quick: dict | None = None):
    """Register ``fn(ctx) -> dict`` as the part ``name`` (see the module docstring)."""
    def register(fn):
        if name in PARTS or name == "all":
            raise ValueError(f"part {name!r} is registered twice (or is reserved)")
        PARTS[name] = Part(name, fn, help, default, in_quick, options, dict(quick or {}))
        return fn
    return register


@dataclasses.dataclass
class RunContext:
    """What every part sees: the options, the modes, the output folder, the results so far, the
    model (loaded on first use) and the built-in task."""

    args: argparse.Namespace
    modes: list[str]
    out_dir: Path
    results: dict
    quiet: bool = False
    shared: dict = dataclasses.field(default_factory=dict)  # data one part leaves for another
    _model: object = None
    _task: object = None

    def progress(self, label: str, total: int) -> Progress:
        return Progress(label, total, enabled=not self.quiet)

    @property
    def model(self):
        if self._model is None:
            from eval.common import load_eval_model

            t0, before = time.perf_counter(), compile_stats().snapshot()
            with self.progress("loading the model and adapters", 1):
                self._model = load_eval_model(self.args)
            m = self._model
            adapters = self.args.adapters
            self.results["model"] = {
                "name": m.config.name, "dtype": str(m.dtype), "adapters": adapters,
                "lora": dataclasses.asdict(m.lora) if m.lora else None,
                "load_seconds": round(time.perf_counter() - t0, 2),
                "load_compilation": compile_stats().since(before)}
            print(f"model {m.config.name} ({m.dtype}), adapters: {adapters} "
                  f"(loaded in {format_seconds(time.perf_counter() - t0)})")
        return self._model

    @property
    def task(self):
        if self._task is None:
            from lragent_jax.tasks.kb import KBTask

            self._task = KBTask(seed=self.args.task_seed, num_train=0,
                                num_valid=max(self.args.tf_episodes, 1),
                                num_test=max(self.args.questions, 1))
        return self._task

    def workflow(self):
        from lragent_jax.workflow import ReActWorkflow

        return ReActWorkflow(self.task.tools("test"), templates=self.task.templates,
                             max_steps=self.args.max_steps)

    def save(self, **extra) -> Path:
        """results.json as it stands (after every part, so a stopped run keeps what it did)."""
        return write_json(self.out_dir / "results.json", {**self.results, **extra})


# ------------------------------------------------------------------------------ accuracy


def _accuracy_options(g):
    g.add_argument("--questions", type=int, default=4,
                   help="test questions per mode (default 4: about 3 minutes for the main job on a "
                        "2-core CPU; the accuracy figures in the README use 32 to 300)")
    g.add_argument("--seeds", type=int, default=1,
                   help="sampled runs per question (needs --temperature > 0; default 1)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of the agents (0 = greedy, the default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    g.add_argument("--batch", type=int, default=8,
                   help="episodes run together, one cache row each (default 8)")
    g.add_argument("--capacity", type=int, default=1024,
                   help="cache positions per trajectory (default 1024; an episode that fills "
                        "its row is rerun at twice the capacity, and said so)")
    g.add_argument("--min-bucket", type=int, default=16,
                   help="smallest padded length of a turn's new tokens, a power of two: each "
                        "distinct padded length compiles once per mode, so larger means fewer "
                        "compilations and more padded prefill work (default 16; --quick uses 256)")
    g.add_argument("--task-seed", type=int, default=0, help="seed of the built-in task")
    g.add_argument("--max-steps", type=int, default=12,
                   help="workflow steps before an episode counts as unfinished (default 12)")


@part("accuracy", default=True, options=_accuracy_options,
      quick={"questions": 2, "batch": 2, "capacity": 2048, "max_steps": 2, "min_bucket": 256},
      help="the ReAct workflow on the built-in task's test questions in every mode: exact match "
           "with standard error, per level, unfinished share, tokens prefilled, cache bytes")
def accuracy(ctx: RunContext) -> dict:
    from eval.accuracy import run_accuracy
    from eval.traces import save_traces, trace_from_record

    args, model = ctx.args, ctx.model
    print(f"\n== accuracy: {args.questions} test questions x {args.seeds} seed(s), "
          f"temperature {args.temperature}, batch {min(args.batch, max(args.questions, 1))}, "
          f"modes {', '.join(ctx.modes)}")
    seeds = list(range(args.seeds))
    total = len(ctx.modes) * args.questions * len(seeds)
    finished: dict[str, int] = {}
    with ctx.progress("episodes", total) as bar:
        def on_progress(mode, done, of):
            finished[mode] = done
            bar.update(sum(finished.values()), note=f"{mode}: {done}/{of}")

        def log(line):
            bar.clear()
            print(line, flush=True)

        acc, episodes = run_accuracy(
            model, ctx.task, workflow=ctx.workflow(), questions=args.questions, modes=ctx.modes,
            seeds=seeds, temperature=args.temperature, top_p=args.top_p, batch=args.batch,
            capacity=args.capacity, min_chunk_bucket=args.min_bucket, log=log,
            progress=on_progress)
    with open(ctx.out_dir / "episodes.jsonl", "w") as f:
        for mode, records in episodes.items():
            for r in records:
                f.write(json.dumps({"mode": mode, **r.to_dict()}, default=str) + "\n")
    # the real rollouts as replayable traces (--trace-file), from the exact reference mode
    recorded = episodes.get("non_shared") or next(iter(episodes.values()), [])
    if recorded:
        path = save_traces(ctx.out_dir / "traces.json",
                           [trace_from_record(r, model.tokenizer) for r in recorded])
        acc["traces_file"] = str(path)
    ctx.shared["accuracy_episodes"] = episodes
    rows = [{"mode": m, "accuracy": v["accuracy"], "stderr": v["stderr"],
             "unfinished": v["unfinished_share"], "malformed": v["malformed_per_episode"],
             "prefilled": sum(v["prefilled"].values()), "seconds": v["seconds"]}
            for m, v in acc["modes"].items()]
    print_table(rows, ["mode", "accuracy", "stderr", "unfinished", "malformed", "prefilled",
                       "seconds"],
                title=f"accuracy per mode (exact match on the built-in task, {acc['questions']} "
                      f"questions; prefilled = tokens, all agents)")
    verdict = separability(acc)
    acc["separable"] = verdict["separable"]
    if not verdict["separable"]:
        print(verdict["message"])
    return acc


def separability(acc: dict) -> dict:
    """Whether the modes' accuracies differ by more than noise: some pair more than two standard
    errors of the difference apart. With a handful of questions they cannot be told apart."""
    modes = acc["modes"]
    names = list(modes)
    widest = 0.0
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa, sb = modes[a]["stderr"], modes[b]["stderr"]
            se = ((sa if sa == sa else 0) ** 2 + (sb if sb == sb else 0) ** 2) ** 0.5
            diff = abs(modes[a]["accuracy"] - modes[b]["accuracy"])
            if se > 0:
                widest = max(widest, diff / se)
            elif diff > 0:
                widest = float("inf")
    separable = widest > 2
    questions = acc["questions"]
    message = (f"note: with {questions} question(s) the modes' accuracies are within two standard "
               "errors of each other: they cannot be told apart here (the teacher-forced part "
               "measures the difference directly; --questions 300 --seeds 5 --temperature 0.7 for "
               "accuracy)")
    return {"separable": separable, "widest_gap_in_stderr": widest,
            "message": None if separable else message}


# ------------------------------------------------------------------------------ rollout


@part("rollout", default=True,
      help="one trajectory, and per mode the tokens each agent prefilled and the cache bytes "
           "(from the accuracy part's episodes when it runs, else one question)")
def rollout(ctx: RunContext) -> dict:
    model = ctx.model
    acc, episodes = ctx.results.get("accuracy"), ctx.shared.get("accuracy_episodes")
    if acc is not None and episodes:
        out = _rollout_from_accuracy(ctx.task, acc, episodes)
    else:
        print("\n== rollout: one test question through every mode")
        out = _run_rollout(ctx)
    print(f"\nquestion: {out['question']['question']}  (gold answer: {out['question']['answer']})")
    print(f"--- trajectory ({out['trajectory_mode']}) ---\n{out['trajectory']}\n---")
    agents = list(model.lora.agents) if model.lora else ["base"]
    print_table([{"mode": m, "answer": v["answer"], "steps": v["steps"],
                  **{f"prefill_{a}": n for a, n in v["prefilled"].items()},
                  "cache_MiB": v["cache_bytes_per_trajectory"] / 2**20}
                 for m, v in out["modes"].items()],
                ["mode", "answer", "steps"] + [f"prefill_{a}" for a in agents] + ["cache_MiB"],
                title=f"per mode: this episode's answer; tokens each agent prefilled over "
                      f"{out['questions']} episode(s); cache MiB per trajectory ({out['dtype']}, "
                      f"{out['capacity']} positions)")
    return out


def _run_rollout(ctx: RunContext) -> dict:
    from eval.accuracy import run_episodes_of_mode

    args, model = ctx.args, ctx.model
    question = ctx.task.split("test")[0]
    out = {"question": dataclasses.asdict(question), "questions": 1, "capacity": args.capacity,
           "dtype": str(model.dtype), "modes": {}}
    workflow = ctx.workflow()
    with ctx.progress("modes", len(ctx.modes)) as bar:
        for i, mode in enumerate(ctx.modes):
            bar.update(i, note=mode)
            records, counts, overflow, total = run_episodes_of_mode(
                model, workflow, [question], mode, batch=1, capacity=args.capacity,
                prefill_chunk=None, seed=0, min_chunk_bucket=args.min_bucket, temperature=0.0,
                top_p=1.0)
            if overflow:
                bar.print(f"  {mode}: the episode filled the {args.capacity}-position cache and "
                          "stopped there (--capacity)")
            record = records[0]
            out["modes"][mode] = {"answer": record.answer, "finished": record.finished,
                                  "steps": record.steps, "prefilled": counts[0],
                                  "cache_bytes": total, "cache_bytes_per_trajectory": total}
            out["trajectory"], out["trajectory_mode"] = record.text, mode
    return out


def _rollout_from_accuracy(task, accuracy: dict, episodes: dict) -> dict:
    """The rollout view of an accuracy run: its first episode per mode, and per mode the tokens each
    agent prefilled over all the run's episodes."""
    question = task.split(accuracy["split"])[0]
    out = {"question": dataclasses.asdict(question), "questions": accuracy["questions"],
           "capacity": accuracy["capacity"], "dtype": accuracy["dtype"], "modes": {}}
    for mode, records in episodes.items():
        record, summary = records[0], accuracy["modes"][mode]
        out["modes"][mode] = {"answer": record.answer, "finished": record.finished,
                              "steps": record.steps, "prefilled": summary["prefilled"],
                              "cache_bytes": summary["cache_bytes"],
                              "cache_bytes_per_trajectory": summary["cache_bytes_per_trajectory"]}
        out["trajectory"], out["trajectory_mode"] = record.text, mode
    return out


# ------------------------------------------------------------------------------ teacher-forced


def _tf_options(g):
    g.add_argument("--tf-episodes", type=int, default=16,
                   help="held-out gold episodes replayed per mode (default 16)")


@part("teacher_forced", options=_tf_options, quick={"tf_episodes": 1},
      help="held-out gold episodes replayed through each mode's cache: each role's log-likelihood "
           "and token accuracy, and the gap to non-shared (the price of sharing)")
def teacher_forced(ctx: RunContext) -> dict:
    from eval.teacher_forced import compare_modes, print_comparison

    args, model = ctx.args, ctx.model
    print(f"\n== teacher-forced: {args.tf_episodes} held-out gold episodes per mode")
    gold = [r.segments for r in ctx.task.gold_episodes("valid")[:args.tf_episodes]]
    longest = max(sum(len(model.tokenizer.encode(s.text)) for s in g) for g in gold)
    capacity = max(args.capacity, 1 << (longest + 8).bit_length())
    with ctx.progress("modes", len(ctx.modes)) as bar:
        tf = compare_modes(lambda mode: model.session(mode, batch=min(args.batch, len(gold)),
                                                      capacity=capacity,
                                                      min_chunk_bucket=args.min_bucket),
                           gold, modes=ctx.modes, log=lambda line: bar.update(advance=1))
    print_comparison(tf)
    return tf


# ------------------------------------------------------------------------------ scienceqa


def _scienceqa_options(g):
    g.add_argument("--scienceqa-dir", default=None,
                   help="published role files (plan/action/reflect.json); default: "
                        "../shared/data/lragent-trajectories/scienceqa when present")
    g.add_argument("--scienceqa-adapters", default=None,
                   help="adapters trained on those files (required for the scienceqa parts); "
                        "'scienceqa': the set shipped in the package (mixed view, shared A)")
    g.add_argument("--scienceqa-samples", type=int, default=32,
                   help="held-out samples per role, at most (default 32)")
    g.add_argument("--scienceqa-valid-fraction", type=float, default=0.05,
                   help="the held-out share: the same split python -m train makes of a folder "
                        "with the same fraction and seed (default 0.05, train's --valid-fraction)")
    g.add_argument("--scienceqa-split-seed", type=int, default=0,
                   help="seed of that split (train's --kb-seed; default 0)")
    g.add_argument("--scienceqa-max-tokens", type=int, default=3072,
                   help="skip samples longer than this (reported)")


@part("scienceqa", in_quick=False, options=_scienceqa_options,
      help="the teacher-forced comparison on the published ScienceQA role files, with "
           "--scienceqa-adapters trained on them")
def scienceqa(ctx: RunContext) -> dict:
    from eval.teacher_forced import run_scienceqa

    return run_scienceqa(ctx)


def _scienceqa_agents_options(g):
    from eval.scienceqa_agents import add_arguments

    add_arguments(g)


@part("scienceqa_agents", in_quick=False, options=_scienceqa_agents_options,
      help="the ScienceQA agents on the 360 published evaluation questions in every mode "
           "(--scienceqa-adapters trained on the published role files)")
def scienceqa_agents(ctx: RunContext) -> dict:
    from eval.common import load_eval_model
    from eval.scienceqa_agents import run_scienceqa_agents

    return run_scienceqa_agents(ctx.args, ctx.modes, load_eval_model, ctx.out_dir)


# ------------------------------------------------------------------------------ efficiency


def _efficiency_options(g):
    g.add_argument("--eff-models", type=csv_list(str), default=["smollm2_135m"],
                   help="model presets to replay on (e.g. smollm2_135m,llama3_1_8b; 'tiny')")
    g.add_argument("--lengths", type=csv_list(int), default=[256, 1024],
                   help="episode lengths in tokens, each >= 256 (default 256,1024)")
    g.add_argument("--trace-file", default=None,
                   help="replay these traces instead of generated ones (e.g. the traces.json "
                        "an accuracy run writes)")
    g.add_argument("--eff-repeats", type=int, default=3, help="timed repeats per row (default 3)")
    g.add_argument("--eff-rank", type=int, default=8, help="adapter rank (default 8)")
    g.add_argument("--eff-attn", type=csv_list(str), default=None,
                   help="attention implementations to compare (default: --attn)")


@part("efficiency", options=_efficiency_options,
      quick={"lengths": [256], "eff_repeats": 1, "eff_models": ["tiny"]},
      help="trace replay on random weights: end-to-end time, time to first token per turn, "
           "tokens/s, prefill counts, cache and device memory")
def efficiency(ctx: RunContext) -> dict:
    import jax
    import jax.numpy as jnp

    from eval.common import tiny_config
    from eval.efficiency import benchmark, summarize
    from eval.traces import generate_trace, load_traces

    args = ctx.args
    traces = (load_traces(args.trace_file) if args.trace_file
              else [generate_trace(n, args.task_seed) for n in args.lengths])
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    rows = []
    for preset in args.eff_models:
        cfg = tiny_config() if preset == "tiny" else ModelConfig.preset(preset)
        for attn in (args.eff_attn or [args.attn]):
            print(f"\n== efficiency: {cfg.name}, attention {attn or 'default'}, "
                  f"{jnp.dtype(dtype).name}, batch 1, {len(traces)} trace(s)")
            done = list(rows)
            with ctx.progress("benchmark rows", len(traces) * len(ctx.modes)) as bar:
                def on_row(measured, done=done, bar=bar):
                    bar.update(len(measured))
                    ctx.save(status="running", efficiency_partial=done + list(measured))

                rows += benchmark(cfg, traces, modes=ctx.modes, attn_impl=attn,
                                  rank=args.eff_rank, repeats=args.eff_repeats,
                                  min_chunk_bucket=max(args.min_bucket, 64), dtype=dtype,
                                  log=bar.print,
                                  on_row=on_row)
    out = {"rows": rows, "summary": summarize(rows), "dtype": jnp.dtype(dtype).name, "batch": 1}
    print_table(rows, ["model", "length", "mode", "attn", "e2e_s", "gen_tok_s", "ttft_mean_s",
                       "prefilled_total", "cache_bytes"],
                title="trace replay per row (seconds; tokens/s; cache bytes for one trajectory)")
    print_table(out["summary"], ["model", "length", "attn", "speed_vs_fully_shared",
                                 "speed_vs_non_shared", "memory_vs_non_shared"],
                title="base_lowrank_shared vs the others (time ratio, >1 = faster)")
    return out


# ------------------------------------------------------------------------------ memory


@part("memory", default=True,
      help="analytic cache bytes per mode for the model that ran and for Llama-3.1-8B shapes")
def memory(ctx: RunContext) -> dict:
    out = memory_summary(ctx)
    rows = [{"cache": label, "dtype": v["dtype"], "positions": v["capacity"],
             **{m: v["bytes"][m] / 2**20 for m in v["bytes"]},
             "lr_vs_non_shared": v["bytes"]["base_lowrank_shared"] / v["bytes"]["non_shared"]}
            for label, v in out.items()]
    print_table(rows, ["cache", "dtype", "positions"] + [m.value for m in ALL_MODES]
                + ["lr_vs_non_shared"],
                title="== memory: cache MiB per trajectory and mode (3 agents, analytic; the "
                      "first row is the cache the rollout used)")
    return out


def memory_summary(ctx: RunContext) -> dict:
    """Analytic cache bytes of one trajectory per mode: the model that ran at the run's dtype and
    capacity, and Llama-3.1-8B shapes in bfloat16 at 16k and 32k positions."""
    import jax.numpy as jnp

    model, args = ctx.model, ctx.args
    rank = model.lora.rank if model.lora else 8
    agents = model.lora.num_agents if model.lora else 3
    has_v = model.lora is None or "v" in model.lora.targets
    capacity = ctx.results.get("accuracy", {}).get("capacity", args.capacity)
    out = {}
    for label, cfg, positions, dtype in (
            (f"{model.config.name} (ran)", model.config, capacity, model.dtype),
            ("llama-3.1-8b @ 16k", ModelConfig.llama3_1_8b(), 16384, jnp.bfloat16),
            ("llama-3.1-8b @ 32k", ModelConfig.llama3_1_8b(), 32768, jnp.bfloat16)):
        out[label] = {"capacity": positions, "dtype": jnp.dtype(dtype).name, "agents": agents,
                      "rank": rank,
                      "bytes": {m.value: analytic_cache_bytes(cfg, m, num_agents=agents,
                                                              capacity=positions, rank=rank,
                                                              dtype=dtype,
                                                              v_adapter=has_v)["total"]
                                for m in ALL_MODES}}
    return out


# ------------------------------------------------------------------------------ throughput


@part("throughput", in_quick=False,
      help="many episodes through the continuous rollout engine, every mode, at the same and "
           "at the largest row counts (uses --lengths, --questions, --batch, --capacity)")
def throughput(ctx: RunContext) -> dict:
    from eval.throughput import run_part

    return run_part(ctx.args, ctx.modes, ctx.out_dir)
