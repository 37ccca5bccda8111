"""``python -m eval`` (or ``lragent-eval``): accuracy, price of sharing, efficiency and memory of
every cache-sharing mode.

With no options this is the project's main job: on the embedded SmolLM2-135M-Instruct with the
shipped role adapters it runs the task accuracy of every mode on a few test questions, shows one
of those trajectories with, per mode, the cache bytes and the tokens each agent prefilled, a memory
summary, and a closing takeaway. ``--parts`` selects more: the teacher-forced comparison, the
published-ScienceQA comparison and the trace-replay efficiency benchmark; ``--quick`` runs every part
at smoke-test size on a tiny random model (options given explicitly still apply).

Every run writes its own folder, results/eval/<date>-<time>[-quick]/ (or --name / --out), with
results.json, episodes.jsonl, traces.json and PNG plots; results/eval/latest points to the newest.
Compiled programs are cached on disk (~/.cache/lragent-jax/xla; --compilation-cache or
$LRAGENT_COMPILATION_CACHE to move it or turn it off), so a second run compiles almost nothing.

The long run behind the README's accuracy figures:
  python -m eval --parts all --questions 300 --seeds 5 --temperature 0.7 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import textwrap
import time
from pathlib import Path

from eval.parts import PARTS, RunContext, csv_list

RESULTS_ROOT = Path("results") / "eval"
# what --quick changes besides each part's own settings (eval.parts); options given win
QUICK = {"model": "tiny", "adapters": "random", "seeds": 1, "temperature": 0.0}
_MODES = ("non_shared", "fully_shared", "base_shared", "base_lowrank_shared")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    default_parts = [name for name, part in PARTS.items() if part.default]
    g.add_argument("--parts", type=csv_list(str), default=default_parts,
                   help="comma-separated parts, or 'all': "
                        + "; ".join(f"{name}: {part.help}" for name, part in PARTS.items())
                        + f" (default: {','.join(default_parts)})")
    g.add_argument("--quick", action="store_true",
                   help="every part but scienceqa at smoke-test size on a tiny random model "
                        "(2-core CPU: about 100 s on a first run, 50 s once compiled); options "
                        "given explicitly still apply")
    g.add_argument("--modes", type=csv_list(str), default=list(_MODES),
                   help="share modes to compare (default: all four)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="base model: a .gguf file or HF folder (default: the embedded "
                        "SmolLM2-135M-Instruct), or 'tiny' for a tiny random model")
    g.add_argument("--adapters", default=None,
                   help="role adapter folder; 'default' for the shipped SmolLM2 adapters (the "
                        "default with the embedded model), 'random' for untrained ones (the "
                        "default with any other model)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter and cache dtype (default float32; bfloat16 on GPU is faster)")
    g.add_argument("--attn", default=None,
                   help="attention implementation: reference, triton, mosaic_tpu (default: best "
                        "for the platform)")
    for part in PARTS.values():
        if part.options is not None:
            part.options(p.add_argument_group(f"{part.name} part"))
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None,
                   help="output folder (default: results/eval/<date>-<time>, -quick for --quick)")
    g.add_argument("--name", default=None, help="output folder results/eval/NAME instead")
    g.add_argument("--overwrite", action="store_true",
                   help="allow --out/--name to replace the results of an earlier run")
    g.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    g.add_argument("--quiet", action="store_true",
                   help="no progress lines (they are off anyway when stderr is not a terminal)")
    g.add_argument("--compilation-cache", default=None, metavar="DIR|off",
                   help="folder of compiled programs kept between runs, or 'off' (default: "
                        "$LRAGENT_COMPILATION_CACHE, else ~/.cache/lragent-jax/xla)")
    return p


# ------------------------------------------------------------------------------ options


def explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options the user gave (their ``dest`` names), whatever their values."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_const"
                kwargs["const"] = True
            probe.add_argument(*action.option_strings, **kwargs)
    namespace, _ = probe.parse_known_args(argv)
    return set(vars(namespace))


def resolve_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, apply ``--quick`` to the options not given, resolve defaults and validate (bad
    values end in ``parser.error``: a message naming them, exit status 2)."""
    args = parser.parse_args(argv)
    given = explicit_options(parser, argv)
    args.explicit = sorted(given)
    if args.quick:
        quick = dict(QUICK, parts=[n for n, part in PARTS.items() if part.in_quick])
        for name in args.parts if "parts" in given else quick["parts"]:
            if name in PARTS:
                quick.update(PARTS[name].quick)
        for dest, value in quick.items():
            if dest not in given:
                setattr(args, dest, value)
    if not args.parts:
        parser.error(f"--parts is empty; choose from {', '.join(PARTS)} or all")
    if "all" in args.parts:
        args.parts = list(PARTS)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; allowed: {', '.join(PARTS)} or all")
    args.parts = [p for p in PARTS if p in args.parts]  # registry order, once each
    if not args.modes:
        parser.error(f"--modes is empty; choose from {', '.join(_MODES)}")
    from lragent_jax.cache import ShareMode

    try:
        args.modes = list(dict.fromkeys(ShareMode.parse(m).value for m in args.modes))
    except ValueError as e:
        parser.error(str(e))
    _check_values(parser, args, given)
    if args.adapters is None:
        args.adapters = "random" if args.model is not None else _default_adapters()
    if args.out is not None and args.name is not None:
        parser.error("give --out or --name, not both")
    return args


def _default_adapters() -> str:
    from lragent_jax.pretrained import shipped_adapters_path

    if shipped_adapters_path() is None:
        print("note: no shipped adapters found; using untrained (random A, zero B) adapters",
              file=sys.stderr)
        return "random"
    return "default"


def _check_values(parser, args, given) -> None:
    at_least = {"questions": 1, "batch": 1, "capacity": 2, "tf_episodes": 1, "seeds": 1,
                "min_bucket": 1, "max_steps": 1, "eff_repeats": 1, "eff_rank": 1,
                "scienceqa_samples": 1, "scienceqa_max_tokens": 1}
    for name, low in at_least.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}; got {value}")
    if args.min_bucket & (args.min_bucket - 1):
        parser.error(f"--min-bucket must be a power of two; got {args.min_bucket}")
    if args.temperature < 0 or args.temperature != args.temperature:
        parser.error(f"--temperature must be >= 0; got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1]; got {args.top_p}")
    if args.seeds > 1 and args.temperature == 0:
        parser.error(f"--seeds {args.seeds} needs --temperature > 0 (greedy decoding gives the "
                     "same episode for every seed)")
    if not 0 < args.scienceqa_valid_fraction < 1:
        parser.error(f"--scienceqa-valid-fraction must be in (0, 1); got "
                     f"{args.scienceqa_valid_fraction}")
    short = [n for n in args.lengths if n < 256]
    if short or not args.lengths:
        parser.error(f"--lengths needs episode lengths >= 256 tokens; got {args.lengths}")
    if args.trace_file is not None and "lengths" in given:
        parser.error("--trace-file replays its own traces: give it or --lengths, not both")
    if not args.eff_models:
        parser.error("--eff-models is empty")


# ------------------------------------------------------------------------------ output folder


def output_folder(args) -> Path:
    """This run's own folder: --out or results/eval/--name (refused if it holds another run's
    results, unless --overwrite), else a new results/eval/<date>-<time>[-quick]."""
    if args.out is not None or args.name is not None:
        folder = Path(args.out) if args.out is not None else RESULTS_ROOT / args.name
        if (folder / "results.json").exists() and not args.overwrite:
            raise ValueError(f"{folder} already holds the results of another run; pass "
                             "--overwrite to replace them, or choose another --out/--name")
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    RESULTS_ROOT.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        folder = RESULTS_ROOT / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            folder.mkdir()  # claims the name: a concurrent run gets the next one
            return folder
        except FileExistsError:
            continue
    raise ValueError(f"cannot find a free folder name for {RESULTS_ROOT / stamp}")


def _point_latest(folder: Path) -> None:
    if folder.parent.resolve() != RESULTS_ROOT.resolve():
        return
    latest = RESULTS_ROOT / "latest"
    try:
        if latest.is_symlink() or not latest.exists():
            tmp = RESULTS_ROOT / f".latest-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(folder.name)
            tmp.replace(latest)
    except OSError:
        pass  # a convenience only


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = resolve_args(parser, argv)
    try:
        return run(args, argv)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args, argv: list[str]) -> int:
    from eval.common import entry_point, environment, invoked_command
    from lragent_jax.runtime import (InterruptGuard, compile_stats, enable_compilation_cache,
                                     resolve_cache_dir)

    cache_dir = enable_compilation_cache(resolve_cache_dir(args.compilation_cache))
    stats = compile_stats()
    before = stats.snapshot()
    out_dir = output_folder(args)
    prog = entry_point()
    if prog not in ("python -m eval", "lragent-eval"):
        prog = "python -m eval"  # called as a function (tests): the equivalent command
    results = {"environment": environment(invoked_command(argv, prog)),
               "args": {k: v for k, v in vars(args).items()},
               "output": str(out_dir), "compilation_cache": str(cache_dir) if cache_dir else None}
    ctx = RunContext(args=args, modes=args.modes, out_dir=out_dir, results=results,
                     quiet=args.quiet)
    ctx.save(status="running")
    print(f"output: {out_dir}" + ("" if cache_dir else "  (compilation cache off)"))
    t_start = time.perf_counter()
    with InterruptGuard(on_timeout=lambda: ctx.save(status="interrupted")):
        try:
            for name in args.parts:
                t0, compiled_before = time.perf_counter(), stats.snapshot()
                results[name] = PARTS[name].run(ctx)
                results.setdefault("timing", {})[name] = {
                    "seconds": round(time.perf_counter() - t0, 2),
                    "compilation": stats.since(compiled_before)}
                ctx.save(status="running")
        except KeyboardInterrupt:
            path = ctx.save(status="interrupted")
            print(f"\ninterrupted: the finished parts are in {path}", file=sys.stderr)
            return 130
        except BaseException as err:
            ctx.save(status="failed", error=str(err))
            raise
    if not args.no_plots:
        results["plots"] = _plots(results, out_dir)
    results["seconds"] = round(time.perf_counter() - t_start, 2)
    results["compilation"] = stats.since(before)
    results["takeaway"] = takeaway(results, out_dir)
    path = ctx.save(status="done")
    _point_latest(out_dir)
    print("\n== takeaway\n" + textwrap.fill(results["takeaway"], 100))
    print(f"\nwrote {path} ({results['seconds']:.0f}s)")
    return 0


# ------------------------------------------------------------------------------ closing


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def takeaway(results: dict, out_dir: Path) -> str:
    """One paragraph: what sharing saved, what it cost, where the results and plots went."""
    from lragent_jax.runtime import format_seconds

    lr, ns = "base_lowrank_shared", "non_shared"
    acc = results.get("accuracy", {}).get("modes", {})
    saved, cost = [], []
    if lr in acc and ns in acc:
        a, b = sum(acc[lr]["prefilled"].values()), sum(acc[ns]["prefilled"].values())
        n = results["accuracy"]["questions"] * len(results["accuracy"]["seeds"])
        saved.append(f"sharing the base and low-rank cache (base_lowrank_shared) prefilled {a:,} "
                     f"tokens where the non-shared agents prefilled {b:,} over {n} episodes "
                     f"({_percent(1 - a / max(b, 1))} fewer)")
    memory = results.get("memory")
    if memory:
        ran = next(iter(memory.values()))
        text = (f"its cache takes {ran['bytes'][lr] / ran['bytes'][ns]:.3f}x the non-shared one "
                f"({ran['bytes'][lr] / 2**20:.1f} vs {ran['bytes'][ns] / 2**20:.1f} MiB per "
                f"trajectory, {ran['dtype']}, {ran['capacity']} positions")
        big = next((v for k, v in memory.items() if "16k" in k), None)
        if big is not None:
            text += (f"; {big['bytes'][lr] / big['bytes'][ns]:.3f}x for Llama-3.1-8B at 16k: "
                     f"{big['bytes'][lr] / 2**30:.2f} vs {big['bytes'][ns] / 2**30:.2f} GiB")
        saved.append(text + ")")
    eff = results.get("efficiency", {}).get("summary") or []
    if eff:
        row = max(eff, key=lambda r: r["length"])
        speeds = [f"{row[key]:.2f}x as fast as {name}" for key, name in
                  (("speed_vs_non_shared", "non-shared"), ("speed_vs_fully_shared", "fully shared"))
                  if isinstance(row.get(key), (int, float))]
        if speeds:
            saved.append(f"replaying a {row['length']}-token episode on {row['model']} it ran "
                         + " and ".join(speeds))
    if lr in acc and ns in acc:
        text = (f"in accuracy it cost {_percent(acc[ns]['accuracy'] - acc[lr]['accuracy'])} "
                f"({_percent(acc[lr]['accuracy'])} vs {_percent(acc[ns]['accuracy'])} non-shared")
        if not results["accuracy"].get("separable", True):
            text += (f"; with {results['accuracy']['questions']} questions the modes cannot be "
                     "told apart")
        cost.append(text + ")")
    tf = results.get("teacher_forced", {})
    if lr in tf and "all" in tf[lr]:
        cost.append(f"teacher-forced, its log-likelihood per output token differs from "
                    f"non-shared by {tf[lr]['all']['logprob_gap_vs_non_shared']:+.4f} nats")
    compiled = results.get("compilation", {})
    where = (f"This run took {format_seconds(results.get('seconds', 0))}, "
             f"{format_seconds(compiled.get('compile_seconds', 0))} of it in XLA compilation of "
             f"{compiled.get('compiles', 0)} programs ({compiled.get('cache_hits', 0)} read from "
             f"the compilation cache). Results: {out_dir / 'results.json'}")
    if results.get("plots"):
        where += "; plots: " + ", ".join(Path(p).name for p in results["plots"])
    sentences = [", and ".join(saved[:2]), "; ".join(saved[2:]), ", and ".join(cost)]
    text = " ".join(s[0].upper() + s[1:] + "." for s in sentences if s)
    return (text + " " if text else "") + where + "."


def _plots(results: dict, out_dir: Path) -> list[str]:
    from eval import plots

    made = []
    if "efficiency" in results and results["efficiency"]["rows"]:
        rows = results["efficiency"]["rows"]
        made.append(str(plots.plot_throughput(rows, out_dir / "throughput.png")))
        made.append(str(plots.plot_ttft(rows, out_dir / "ttft.png")))
    if "memory" in results:
        made.append(str(plots.plot_memory(
            {f"{label}\n{v['dtype']}, {v['capacity']} positions": v["bytes"]
             for label, v in results["memory"].items()}, out_dir / "memory.png")))
    if "accuracy" in results:
        acc = results["accuracy"]
        label = f"{results['model']['name']} (T={acc['temperature']}, {acc['questions']} questions)"
        made.append(str(plots.plot_accuracy(
            {label: acc["modes"]}, out_dir / "accuracy.png",
            note=None if acc.get("separable", True) else
            f"{acc['questions']} questions: the modes cannot be told apart")))
    return made


def tiny_config():
    """The random model of ``--model tiny`` / ``--quick`` (see ``eval.common.tiny_config``)."""
    from eval.common import tiny_config as config

    return config()


if __name__ == "__main__":
    sys.exit(main())
