"""``python -m eval``: accuracy, price of sharing, efficiency and memory of every cache-sharing mode.

With no options this is the project's main job: on the embedded SmolLM2-135M-Instruct with the
shipped role adapters it runs a short multi-agent rollout (printing one trajectory and, per mode,
the cache bytes and the tokens each agent prefilled), the task accuracy of every mode on a few test
questions, and a memory summary. ``--parts`` selects more: the teacher-forced comparison, the
published-ScienceQA comparison and the trace-replay efficiency benchmark; ``--quick`` runs every part
at smoke-test size on a tiny random model (under a minute on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from eval.common import environment, print_table, write_json
from lragent_jax.cache import ALL_MODES, ShareMode, analytic_cache_bytes
from lragent_jax.config import LoraConfig, ModelConfig
from lragent_jax.lora import init_adapters
from lragent_jax.model import init_params
from lragent_jax.pretrained import Model, load_pretrained
from lragent_jax.tasks.kb import KBTask
from lragent_jax.tokenizer import ByteTokenizer
from lragent_jax.workflow import ReActWorkflow

PARTS = ("rollout", "accuracy", "teacher_forced", "scienceqa", "scienceqa_agents", "efficiency",
         "memory", "throughput")
DEFAULT_PARTS = ("rollout", "accuracy", "memory")
SHIPPED_ADAPTERS = "smollm2-135m-kb"


def shipped_adapters_path() -> Path | None:
    path = Path(str(importlib.resources.files("lragent_jax"))) / "assets" / "adapters" / SHIPPED_ADAPTERS
    return path if path.is_dir() else None


def _csv(kind):
    def parse(text):
        try:
            return [kind(v) for v in text.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list; got {text!r}")
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--parts", type=_csv(str), default=list(DEFAULT_PARTS),
                   help=f"comma-separated parts from {', '.join(PARTS)} or 'all' "
                        f"(default: {','.join(DEFAULT_PARTS)})")
    g.add_argument("--quick", action="store_true",
                   help="every part at smoke-test size on a tiny random model (< 1 min on CPU)")
    g.add_argument("--modes", type=_csv(str), default=[m.value for m in ALL_MODES],
                   help="share modes to compare (default: all four)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="base model: a .gguf file or HF folder (default: the embedded "
                        "SmolLM2-135M-Instruct), or 'tiny' for a tiny random model")
    g.add_argument("--adapters", default=None,
                   help="role adapter folder (default: the shipped SmolLM2 adapters); 'random' "
                        "for untrained ones")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter dtype (default float32; bfloat16 on GPU is faster)")
    g.add_argument("--attn", default=None,
                   help="attention implementation: reference, triton, mosaic_tpu (default: best "
                        "for the platform)")
    g = p.add_argument_group("accuracy (built-in task)")
    g.add_argument("--questions", type=int, default=8, help="test questions per mode (default 8)")
    g.add_argument("--seeds", type=int, default=1,
                   help="sampled runs per question (with --temperature > 0; default 1)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of the agents (0 = greedy, the default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--batch", type=int, default=8, help="episodes run together (default 8)")
    g.add_argument("--capacity", type=int, default=2048, help="cache positions per trajectory")
    g.add_argument("--min-bucket", type=int, default=64,
                   help="smallest padded length of a turn's new tokens: each distinct padded "
                        "length compiles once per mode, so larger means fewer compilations and "
                        "more padding (default 64; --quick uses 256)")
    g.add_argument("--task-seed", type=int, default=0, help="seed of the built-in task")
    g.add_argument("--max-steps", type=int, default=12,
                   help="workflow steps before an episode counts as unfinished (default 12)")
    g = p.add_argument_group("teacher-forced comparison")
    g.add_argument("--tf-episodes", type=int, default=16,
                   help="held-out gold episodes replayed per mode (default 16)")
    g.add_argument("--scienceqa-dir", default=None,
                   help="published role files (plan/action/reflect.json); default: "
                        "../shared/data/lragent-trajectories/scienceqa when present")
    g.add_argument("--scienceqa-adapters", default=None,
                   help="adapters trained on those files (required for the scienceqa part)")
    g.add_argument("--scienceqa-samples", type=int, default=32,
                   help="held-out samples per role, at most (default 32)")
    g.add_argument("--scienceqa-valid-fraction", type=float, default=0.05,
                   help="the held-out share: the same split python -m train makes of a folder "
                        "with the same fraction and seed (default 0.05, train's --valid-fraction)")
    g.add_argument("--scienceqa-split-seed", type=int, default=0,
                   help="seed of that split (train's --kb-seed; default 0)")
    g.add_argument("--scienceqa-max-tokens", type=int, default=3072,
                   help="skip samples longer than this (reported)")
    g = p.add_argument_group("efficiency (trace replay, random weights)")
    g.add_argument("--eff-models", type=_csv(str), default=["smollm2_135m"],
                   help="model presets to replay on (e.g. smollm2_135m,llama3_1_8b)")
    g.add_argument("--lengths", type=_csv(int), default=[256, 1024],
                   help="episode lengths in tokens (default 256,1024)")
    g.add_argument("--trace-file", default=None, help="replay these traces instead")
    g.add_argument("--eff-repeats", type=int, default=3)
    g.add_argument("--eff-rank", type=int, default=8)
    g.add_argument("--eff-attn", type=_csv(str), default=None,
                   help="attention implementations to compare in efficiency (default: --attn)")
    from eval.scienceqa_agents import add_arguments as scienceqa_agents_arguments

    scienceqa_agents_arguments(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="results/eval", help="output folder (JSON + PNG plots)")
    g.add_argument("--no-plots", action="store_true")
    return p


def tiny_config() -> ModelConfig:
    """The random model of ``--model tiny`` / ``--quick`` (byte tokens)."""
    return ModelConfig.tiny(vocab_size=ByteTokenizer.vocab_size,
                            eos_token_ids=ByteTokenizer.eos_token_ids, num_heads=4,
                            num_kv_heads=2, head_dim=16, hidden_size=64, intermediate_size=128,
                            num_layers=2)


def _load_model(args) -> Model:
    dtype = jnp.dtype(args.dtype)
    if args.model == "tiny":
        tok, cfg = ByteTokenizer(), tiny_config()
        model = Model(config=cfg, params=init_params(jax.random.key(0), cfg, dtype),
                      tokenizer=tok, attn_impl=args.attn)
    else:
        model = load_pretrained(args.model, dtype=dtype, attn_impl=args.attn)
    adapters = args.adapters
    if adapters is None and args.model is None:
        shipped = shipped_adapters_path()
        adapters = str(shipped) if shipped else "random"
        if shipped is None:
            print("note: no shipped adapters found; using untrained (random A, zero B) adapters")
    if adapters is None or adapters == "random":
        lora = LoraConfig(rank=8, targets=("q", "v", "o", "gate", "up", "down"))
        b_scale = 0.05 if args.model == "tiny" else 0.0
        return model.with_adapters(init_adapters(jax.random.key(1), model.config, lora,
                                                 dtype=dtype, b_scale=b_scale), lora)
    from lragent_jax.adapters_io import load_adapters

    loaded, lora = load_adapters(adapters, config=model.config, dtype=dtype)
    return model.with_adapters(loaded, lora)


def _apply_quick(args) -> None:
    args.model = args.model or "tiny"
    if args.adapters is None:
        args.adapters = "random"
    args.parts = [p for p in PARTS if p not in ("scienceqa", "scienceqa_agents", "throughput")]
    args.questions, args.batch, args.tf_episodes = 2, 2, 1
    args.seeds, args.temperature = 1, 0.0
    args.capacity, args.max_steps = 1024, 2
    args.min_bucket = 256  # few padded turn shapes per mode: compiling dominates here
    args.lengths, args.eff_repeats = [256], 1
    args.eff_models = ["tiny"]


def run_rollout(model, task, workflow, modes, args, log=print) -> dict:
    """One question through every mode: the trajectory, bytes and prefill counts."""
    from lragent_jax.agents import run_model_episodes

    question = task.split("test")[0]
    out = {"question": dataclasses.asdict(question), "questions": 1, "modes": {}}
    for mode in modes:
        session = model.session(mode, batch=1, capacity=args.capacity,
                                min_chunk_bucket=args.min_bucket, min_new_bucket=128)
        record = run_model_episodes(workflow, [question], session)[0]
        out["modes"][mode] = {"answer": record.answer, "finished": record.finished,
                              "steps": record.steps, "prefilled": session.prefill_counts(),
                              "cache_bytes": session.cache_bytes()["total"]}
        out["trajectory"], out["trajectory_mode"] = record.text, mode
    return out


def rollout_from_accuracy(task, accuracy: dict, episodes: dict) -> dict:
    """The rollout view of an accuracy run: its first episode per mode, and per mode the tokens each
    agent prefilled over all the run's episodes."""
    question = task.split(accuracy["split"])[0]
    out = {"question": dataclasses.asdict(question), "questions": accuracy["questions"],
           "modes": {}}
    for mode, records in episodes.items():
        record, summary = records[0], accuracy["modes"][mode]
        out["modes"][mode] = {"answer": record.answer, "finished": record.finished,
                              "steps": record.steps, "prefilled": summary["prefilled"],
                              "cache_bytes": summary["cache_bytes"]}
        out["trajectory"], out["trajectory_mode"] = record.text, mode
    return out


def memory_summary(model, args) -> dict:
    """Analytic cache bytes per mode for this model and for Llama-3.1-8B shapes (3 agents, r=8)."""
    rank = model.lora.rank if model.lora else 8
    has_v = model.lora is None or "v" in model.lora.targets
    out = {}
    for label, cfg, capacity in ((f"{model.config.name} @ {args.capacity}", model.config,
                                  args.capacity),
                                 ("llama-3.1-8b @ 16k", ModelConfig.llama3_1_8b(), 16384),
                                 ("llama-3.1-8b @ 32k", ModelConfig.llama3_1_8b(), 32768)):
        out[label] = {m.value: analytic_cache_bytes(cfg, m, num_agents=3, capacity=capacity,
                                                    rank=rank, v_adapter=has_v)["total"]
                      for m in ALL_MODES}
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        _apply_quick(args)
    if "all" in args.parts:
        args.parts = list(PARTS)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; allowed: {', '.join(PARTS)} or all")
    try:
        modes = [ShareMode.parse(m).value for m in args.modes]
    except ValueError as e:
        parser.error(str(e))
    for name in ("questions", "batch", "capacity", "tf_episodes", "seeds", "min_bucket"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results = {"environment": environment(), "args": vars(args)}

    needs_model = any(p in args.parts for p in ("rollout", "accuracy", "teacher_forced", "memory"))
    model = _load_model(args) if needs_model else None
    if model is not None:
        results["model"] = {"name": model.config.name,
                            "adapters": args.adapters or str(shipped_adapters_path()),
                            "lora": dataclasses.asdict(model.lora) if model.lora else None}
        print(f"model {model.config.name}, adapters: {results['model']['adapters']}")
    task = KBTask(seed=args.task_seed, num_train=0, num_valid=max(args.tf_episodes, 1),
                  num_test=max(args.questions, 1))
    workflow = ReActWorkflow(task.tools("test"), templates=task.templates,
                             max_steps=args.max_steps)

    if "accuracy" in args.parts:
        from eval.accuracy import run_accuracy

        print(f"\n== accuracy: {args.questions} test questions x {args.seeds} seed(s), "
              f"temperature {args.temperature}, every mode")
        seeds = list(range(args.seeds)) if args.temperature > 0 else [0]
        acc, episodes = run_accuracy(model, task, workflow=workflow, questions=args.questions,
                                     modes=modes, seeds=seeds, temperature=args.temperature,
                                     top_p=args.top_p, batch=args.batch, capacity=args.capacity,
                                     min_chunk_bucket=args.min_bucket)
        results["accuracy"] = acc
        with open(out_dir / "episodes.jsonl", "w") as f:
            for mode, records in episodes.items():
                for r in records:
                    f.write(json.dumps({"mode": mode, **r.to_dict()}, default=str) + "\n")
        # the real rollouts as replayable traces (--trace-file), from the exact reference mode
        from eval.traces import save_traces, trace_from_record

        recorded = episodes.get("non_shared") or next(iter(episodes.values()), [])
        if recorded:
            path = save_traces(out_dir / "traces.json",
                               [trace_from_record(r, model.tokenizer) for r in recorded])
            results["accuracy"]["traces_file"] = str(path)

    if "rollout" in args.parts:
        if "accuracy" in args.parts:
            rollout = rollout_from_accuracy(task, acc, episodes)
        else:
            print("\n== rollout: one test question through every mode")
            rollout = run_rollout(model, task, workflow, modes, args)
        results["rollout"] = rollout
        print(f"\nquestion: {rollout['question']['question']}  "
              f"(gold answer: {rollout['question']['answer']})")
        print(f"--- trajectory ({rollout['trajectory_mode']}) ---\n{rollout['trajectory']}\n---")
        print_table([{"mode": m, "answer": v["answer"], "steps": v["steps"],
                      **{f"prefill_{a}": n for a, n in v["prefilled"].items()},
                      "cache_MB": v["cache_bytes"] / 1e6} for m, v in rollout["modes"].items()],
                    ["mode", "answer", "steps"] + [f"prefill_{a}" for a in model.lora.agents]
                    + ["cache_MB"],
                    title=f"per mode: this episode's answer, and tokens each agent prefilled over "
                          f"{rollout['questions']} episode(s)")

    if "accuracy" in args.parts:
        print_table([{"mode": m, "accuracy": v["accuracy"], "stderr": v["stderr"],
                      "unfinished": v["unfinished_share"], "malformed": v["malformed_per_episode"],
                      "prefilled": sum(v["prefilled"].values()), "seconds": v["seconds"]}
                     for m, v in acc["modes"].items()],
                    ["mode", "accuracy", "stderr", "unfinished", "malformed", "prefilled",
                     "seconds"], title="accuracy per mode (exact match on the built-in task)")

    if "teacher_forced" in args.parts:
        from eval.teacher_forced import compare_modes

        print(f"\n== teacher-forced: {args.tf_episodes} held-out gold episodes per mode")
        gold = [r.segments for r in task.gold_episodes("valid")[:args.tf_episodes]]
        longest = max(sum(len(model.tokenizer.encode(s.text)) for s in g) for g in gold)
        capacity = max(args.capacity, 1 << (longest + 8).bit_length())
        tf = compare_modes(lambda mode: model.session(mode, batch=min(args.batch, len(gold)),
                                                      capacity=capacity,
                                                      min_chunk_bucket=args.min_bucket),
                           gold, modes=modes)
        results["teacher_forced"] = tf
        _print_tf(tf)

    if "scienceqa" in args.parts:
        results["scienceqa"] = _run_scienceqa(args, modes)

    if "scienceqa_agents" in args.parts:
        from eval.scienceqa_agents import run_scienceqa_agents

        results["scienceqa_agents"] = run_scienceqa_agents(args, modes, _load_model, out_dir)

    if "efficiency" in args.parts:
        from eval.efficiency import benchmark, summarize
        from eval.traces import generate_trace, load_traces

        traces = (load_traces(args.trace_file) if args.trace_file
                  else [generate_trace(n, args.task_seed) for n in args.lengths])
        rows = []
        for preset in args.eff_models:
            cfg = tiny_config() if preset == "tiny" else ModelConfig.preset(preset)
            for attn in (args.eff_attn or [args.attn]):
                print(f"\n== efficiency: {cfg.name}, attention {attn or 'default'}")
                rows += benchmark(cfg, traces, modes=modes, attn_impl=attn, rank=args.eff_rank,
                                  repeats=args.eff_repeats, min_chunk_bucket=args.min_bucket,
                                  dtype=jnp.bfloat16 if jax.default_backend() != "cpu"
                                  else jnp.float32)
        results["efficiency"] = {"rows": rows, "summary": summarize(rows)}
        print_table(rows, ["model", "length", "mode", "attn", "e2e_s", "gen_tok_s", "ttft_mean_s",
                           "prefilled_total", "cache_bytes"])
        print_table(results["efficiency"]["summary"],
                    ["model", "length", "attn", "speed_vs_fully_shared", "speed_vs_non_shared",
                     "memory_vs_non_shared"],
                    title="base_lowrank_shared vs the others (time ratio, >1 = faster)")

    if "throughput" in args.parts:
        from eval.throughput import run_part

        results["throughput"] = run_part(args, modes, out_dir)

    if "memory" in args.parts:
        memory = memory_summary(model, args)
        results["memory"] = memory
        rows = [{"cache": label, **{m: v[m] / 2**20 for m in v},
                 "ratio_lr_vs_non_shared": v["base_lowrank_shared"] / v["non_shared"]}
                for label, v in memory.items()]
        print_table(rows, ["cache"] + [m.value for m in ALL_MODES] + ["ratio_lr_vs_non_shared"],
                    title="== memory: analytic cache MiB per mode (3 agents)")

    if not args.no_plots:
        results["plots"] = _plots(results, out_dir)
    results["seconds"] = time.perf_counter() - t_start
    path = write_json(out_dir / "results.json", results)
    print(f"\nwrote {path} ({results['seconds']:.0f}s)")
    return 0


def _print_tf(tf: dict) -> None:
    rows = []
    for mode, roles in tf.items():
        for role, v in roles.items():
            rows.append({"mode": mode, "role": role, "tokens": v["tokens"],
                         "logprob/token": v["logprob_per_token"],
                         "token_acc": v["token_accuracy"],
                         "gap_vs_non_shared": v.get("logprob_gap_vs_non_shared"),
                         "acc_gap": v.get("token_accuracy_gap_vs_non_shared")})
    print_table(rows, ["mode", "role", "tokens", "logprob/token", "token_acc",
                       "gap_vs_non_shared", "acc_gap"])


def _run_scienceqa(args, modes) -> dict:
    from eval.teacher_forced import compare_modes, segment_published_sample
    from lragent_jax.tasks.scienceqa import load_role_files
    from train.data import split_validation

    folder = args.scienceqa_dir or _default_scienceqa_dir()
    if folder is None:
        print("\n== scienceqa: skipped (published trajectories not found)")
        return {"skipped": "published trajectories not found"}
    if args.scienceqa_adapters is None:
        print("\n== scienceqa: skipped (no --scienceqa-adapters given)")
        return {"skipped": "no --scienceqa-adapters"}
    print(f"\n== scienceqa: teacher-forced comparison on {folder}")
    model = _load_model(argparse.Namespace(**{**vars(args),
                                              "adapters": args.scienceqa_adapters}))
    if not 0.0 < args.scienceqa_valid_fraction < 1.0:
        raise SystemExit(f"--scienceqa-valid-fraction must be in (0, 1); got "
                         f"{args.scienceqa_valid_fraction}")
    # the samples python -m train held out of this folder: never trained on
    _, held_out = split_validation(load_role_files(folder), args.scienceqa_valid_fraction,
                                   args.scienceqa_split_seed)
    episodes, skipped = [], 0
    for role in model.lora.agents:
        for sample in held_out.get(role, [])[:args.scienceqa_samples]:
            segs = segment_published_sample(sample, role)
            n = sum(len(model.tokenizer.encode(s.text)) for s in segs)
            if n > args.scienceqa_max_tokens:
                skipped += 1
                continue
            episodes.append(segs)
    print(f"  {len(episodes)} held-out samples, {skipped} longer than "
          f"{args.scienceqa_max_tokens} tokens skipped")
    capacity = 1 << (args.scienceqa_max_tokens + 64 - 1).bit_length()
    tf = compare_modes(lambda mode: model.session(mode, batch=min(args.batch, 8),
                                                  capacity=capacity, prefill_chunk=1024,
                                                  min_chunk_bucket=args.min_bucket),
                       episodes, modes=modes, only_last=True)
    _print_tf(tf)
    return {"folder": str(folder), "samples": len(episodes), "skipped_long": skipped,
            "held_out": {"fraction": args.scienceqa_valid_fraction,
                         "seed": args.scienceqa_split_seed},
            "comparison": tf}


def _default_scienceqa_dir():
    """The published ScienceQA role files beside the project, if present."""
    import os

    candidates = []
    if os.environ.get("LRAGENT_DATA_DIR"):
        candidates.append(Path(os.environ["LRAGENT_DATA_DIR"]) / "scienceqa")
    repo = Path(__file__).resolve().parent.parent
    candidates += [repo.parent / "shared" / "data" / "lragent-trajectories" / "scienceqa",
                   Path.cwd().parent / "shared" / "data" / "lragent-trajectories" / "scienceqa"]
    return next((c for c in candidates if (c / "plan.json").is_file()), None)


def _plots(results: dict, out_dir: Path) -> list[str]:
    from eval import plots

    made = []
    if "efficiency" in results and results["efficiency"]["rows"]:
        rows = results["efficiency"]["rows"]
        made.append(str(plots.plot_throughput(rows, out_dir / "throughput.png")))
        made.append(str(plots.plot_ttft(rows, out_dir / "ttft.png")))
    if "memory" in results:
        made.append(str(plots.plot_memory(results["memory"], out_dir / "memory.png")))
    if "accuracy" in results:
        label = f"{results['model']['name']} (T={results['accuracy']['temperature']})"
        made.append(str(plots.plot_accuracy({label: results["accuracy"]["modes"]},
                                            out_dir / "accuracy.png")))
    return made


if __name__ == "__main__":
    sys.exit(main())
