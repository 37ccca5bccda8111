"""``python -m eval --parts scienceqa_agents``: the paper's ScienceQA agents, offline, in every mode.

The published evaluation questions (``scienceqa-eval``, 360, three grade bands) are answered by the
plan / action / reflect agents of ``lragent_jax.tasks.scienceqa.ScienceQAWorkflow`` (the published
prompt; ``Image2Text`` from each question's caption and OCR; ``BingSearch`` / ``Retrieve`` from a
BM25 index over the observations of the published trajectories), ``--sqa-runs`` sampled runs per
question, in every sharing mode, with the ``--scienceqa-adapters`` trained on the published role
files. Reported per mode: exact match of the option letter with its standard error (clustered by
question), the paired difference to non-shared with its standard error, per grade band and per
subject, the unfinished and malformed shares, prefill counts and cache bytes; and for reference the
same agents with every B set to zero (the bare base model) and the chance level. Every mode sees the
same questions in the same batches with the same sampling seed, so the modes' differences are not
drowned in sampling noise. The non-shared episodes are saved as replayable traces
(``scienceqa_traces.json``, for ``--trace-file`` / ``eval.efficiency``), all episodes as JSONL.

Standard error: with p_q a question's accuracy, Var(acc) = (Var_q(p_q) + E_q[p_q (1 - p_q)] / R) / Q,
so more runs shrink only the second term (with Var_q = 0.10 and E_q = 0.15, R = 1 / 4 / 20 give
2.6 / 1.9 / 1.7 points for Q = 360); the paired difference between two modes has no
between-question term: ``--sqa-runs 4`` (the default) puts it at about sqrt(2 * 0.15 / (4 * 360))
= 1.4 points if the modes sampled independently, and lower where the shared seeds make them
sample alike (the reported standard error is the measured one).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from eval.common import print_table, write_json

PART = "scienceqa_agents"
BASELINE = "no_adapter"


def add_arguments(g) -> None:
    """The part's options, added to ``g`` (an argparse group; the part also uses --scienceqa-dir
    and --scienceqa-adapters, 'random' for untrained)."""
    g.add_argument("--scienceqa-eval-dir", default=None,
                   help="published evaluation questions (grade1-4/5-8/9-12.json); default: "
                        "scienceqa-eval beside --scienceqa-dir")
    g.add_argument("--sqa-questions", type=int, default=None,
                   help="questions, taking the grade bands in turn (default: all 360)")
    g.add_argument("--sqa-runs", type=int, default=4,
                   help="sampled runs per question and mode (default 4; 1 when greedy)")
    g.add_argument("--sqa-temperature", type=float, default=0.7,
                   help="sampling temperature (default 0.7; 0 = greedy)")
    g.add_argument("--sqa-top-p", type=float, default=1.0)
    g.add_argument("--sqa-seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--sqa-batch", type=int, default=32,
                   help="episodes run together (default 32)")
    g.add_argument("--sqa-capacity", type=int, default=4096,
                   help="cache positions per episode (default 4096)")
    g.add_argument("--sqa-max-steps", type=int, default=8,
                   help="thought steps before an episode counts as unfinished (default 8)")
    g.add_argument("--sqa-baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the agents with every B set to zero (default on)")


def argument_problem(args) -> str | None:
    """A message for the first bad ScienceQA flag, or None."""
    for name, low in (("sqa_runs", 1), ("sqa_batch", 1), ("sqa_max_steps", 1),
                      ("sqa_capacity", 256)):
        value = getattr(args, name)
        if value < low:
            return f"--{name.replace('_', '-')} must be >= {low}; got {value}"
    if args.sqa_questions is not None and args.sqa_questions < 1:
        return f"--sqa-questions must be >= 1; got {args.sqa_questions}"
    if not math.isfinite(args.sqa_temperature) or args.sqa_temperature < 0:
        return f"--sqa-temperature must be a finite number >= 0; got {args.sqa_temperature}"
    if not 0.0 < args.sqa_top_p <= 1.0:
        return f"--sqa-top-p must be in (0, 1]; got {args.sqa_top_p}"
    return None


def default_folders(args) -> tuple[Path | None, Path | None]:
    """(role files, evaluation questions): the flags, else the published data beside the project."""
    from eval.teacher_forced import default_scienceqa_dir

    folder = Path(args.scienceqa_dir) if args.scienceqa_dir else default_scienceqa_dir()
    eval_folder = Path(args.scienceqa_eval_dir) if args.scienceqa_eval_dir else (
        folder.parent / "scienceqa-eval" if folder is not None else None)
    return folder, eval_folder


def rollout(workflow, tasks, session, *, temperature: float, top_p: float) -> list:
    """The one place episodes are run: every task as an episode through ``session``."""
    from lragent_jax.agents import run_model_episodes

    return run_model_episodes(workflow, tasks, session, temperature=temperature, top_p=top_p)


def run_scienceqa_agents(args, modes: Sequence[str], load_model: Callable, out_dir: Path,
                         log=print) -> dict:
    """Runs the part; ``load_model(args)`` builds the model with ``args.adapters``. Writes
    ``scienceqa_agents.json`` (after every mode), ``scienceqa_episodes.jsonl`` and
    ``scienceqa_traces.json`` under ``out_dir``."""
    from lragent_jax.tasks.scienceqa import ScienceQAWorkflow, chance_level

    problem = argument_problem(args)
    if problem:
        raise SystemExit(f"error: {problem}")
    inputs = _inputs(args, log)
    if "skipped" in inputs:
        return inputs
    folder, eval_folder, corpus, questions = (inputs[k] for k in ("folder", "eval_folder",
                                                                  "corpus", "questions"))
    runs = args.sqa_runs if args.sqa_temperature > 0 else 1
    model = load_model(argparse.Namespace(**{**vars(args), "adapters": args.scienceqa_adapters}))
    workflow = ScienceQAWorkflow(corpus, max_steps=args.sqa_max_steps)
    tasks = [q for _ in range(runs) for q in questions]
    log(f"\n== {PART}: {len(questions)} questions x {runs} run(s), temperature "
        f"{args.sqa_temperature}, adapters {args.scienceqa_adapters}; tools from {folder} "
        f"({corpus.describe()})")
    result = {"folder": str(folder), "eval_folder": str(eval_folder),
              "adapters": str(args.scienceqa_adapters), "questions": len(questions), "runs": runs,
              "temperature": args.sqa_temperature, "top_p": args.sqa_top_p, "seed": args.sqa_seed,
              "max_steps": args.sqa_max_steps, "capacity": args.sqa_capacity,
              "batch": args.sqa_batch, "corpus": corpus.describe(),
              "chance": chance_level(questions), "question_ids": [q.id for q in questions],
              "modes": {}, "skipped_modes": {}}
    jobs = [(mode, model) for mode in modes]
    if args.sqa_baseline:
        jobs.append((BASELINE, model.with_adapters(zero_b(model.adapters), model.lora)))
    episodes_path = out_dir / "scienceqa_episodes.jsonl"
    episodes_path.write_text("")
    reference_records = None
    for name, job_model in jobs:
        records = _run_mode(name, job_model, workflow, tasks, args, result, log)
        if records is None:
            continue
        if name == "non_shared":
            reference_records = records
        with open(episodes_path, "a") as f:
            for i, record in enumerate(records):
                f.write(json.dumps({"mode": name, "run": i // len(questions), **record.to_dict()},
                                   default=str) + "\n")
        write_json(out_dir / "scienceqa_agents.json", result)
    _compare_and_save(result, reference_records, model.tokenizer, out_dir, len(questions))
    result["episodes_file"] = str(episodes_path)
    write_json(out_dir / "scienceqa_agents.json", result)
    print_summary(result)
    return result


def _inputs(args, log) -> dict:
    """The part's folders, tool corpus and questions, or ``{"skipped": why}``."""
    from lragent_jax.tasks.scienceqa import (PublishedCorpus, load_eval_questions,
                                             select_questions)

    folder, eval_folder = default_folders(args)
    if folder is None or eval_folder is None or not eval_folder.is_dir():
        log(f"\n== {PART}: skipped (published trajectories or evaluation questions not found)")
        return {"skipped": "published trajectories or evaluation questions not found"}
    if args.scienceqa_adapters is None:
        log(f"\n== {PART}: skipped (no --scienceqa-adapters given)")
        return {"skipped": "no --scienceqa-adapters"}
    try:
        corpus = PublishedCorpus.from_folder(folder)
        questions = select_questions(load_eval_questions(eval_folder), args.sqa_questions)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return {"folder": folder, "eval_folder": eval_folder, "corpus": corpus,
            "questions": questions}


def _run_mode(name: str, model, workflow, tasks: list, args, result: dict, log) -> list | None:
    """Every task as an episode in one mode (``BASELINE``: non-shared, B = 0); its summary goes
    into ``result``. None when the model cannot run in that mode (recorded as skipped)."""
    mode = "non_shared" if name == BASELINE else name
    try:
        session = model.session(mode, batch=min(args.sqa_batch, len(tasks)),
                                capacity=args.sqa_capacity, seed=args.sqa_seed,
                                min_chunk_bucket=args.min_bucket, min_new_bucket=64)
    except ValueError as error:  # e.g. base+LR sharing with independent A
        result["skipped_modes"][name] = str(error)
        log(f"  {name}: skipped ({error})")
        return None
    t0 = time.perf_counter()
    records = rollout(workflow, tasks, session, temperature=args.sqa_temperature,
                      top_p=args.sqa_top_p)
    seconds = time.perf_counter() - t0
    summary = summarize(records)
    summary.update(prefilled=session.prefill_counts(), cache_bytes=session.cache_bytes()["total"],
                   seconds=seconds)
    result["modes"][name] = summary
    log(f"  {name}: {summary['accuracy']:.3f} ± {summary['stderr']:.3f} (unfinished "
        f"{summary['unfinished_share']:.2f}, malformed {summary['malformed_share']:.2f}, "
        f"{seconds:.1f}s)")
    return records


def _compare_and_save(result: dict, reference_records: list | None, tokenizer, out_dir: Path,
                      questions: int) -> None:
    """Each mode's paired difference to non-shared, and non-shared's episodes as traces."""
    reference = result["modes"].get("non_shared")
    if reference is not None:
        for summary in result["modes"].values():
            summary["vs_non_shared"] = paired_difference(summary["outcomes"],
                                                         reference["outcomes"], questions)
    if reference_records:
        from eval.traces import save_traces, trace_from_record

        path = save_traces(out_dir / "scienceqa_traces.json",
                           [trace_from_record(r, tokenizer) for r in reference_records])
        result["traces_file"] = str(path)


def zero_b(adapters: dict) -> dict:
    """The same adapters with every B zero: each agent is the bare base model."""
    import jax.numpy as jnp

    return {module: {**leaves, "b": jnp.zeros_like(leaves["b"])}
            for module, leaves in adapters.items()}


def summarize(records: Sequence) -> dict:
    """Accuracy of episodes on ``ScienceQuestion``s, overall, per grade band and per subject."""
    from lragent_jax.tasks.scienceqa import score_question
    from lragent_jax.tasks.scoring import aggregate

    outcomes = [score_question(r) for r in records]
    tasks = [r.task for r in records]
    summary = aggregate(outcomes, by_level=False).to_dict()
    summary.pop("per_level")
    for key, field in (("per_band", "band"), ("per_subject", "subject")):
        groups = sorted({getattr(t, field) for t in tasks})
        summary[key] = {}
        for group in groups:
            part = aggregate([o for o, t in zip(outcomes, tasks) if getattr(t, field) == group],
                             by_level=False).to_dict()
            part.pop("per_level")
            summary[key][group] = part
    # an episode that filled its cache row ends unfinished; ModelPolicy answers it with "" turns
    summary["out_of_capacity"] = sum(any(t.raw_output == "" and t.stop_reason == "length"
                                         for t in r.turns) for r in records)
    summary["outcomes"] = [o.status for o in outcomes]
    return summary


def paired_difference(outcomes: Sequence[str], reference: Sequence[str], questions: int) -> dict:
    """Accuracy minus the reference's on the same episodes, and the standard error of that
    difference over questions (each question's runs averaged first). ``outcomes`` are in
    run-major order, ``questions`` per run."""
    if len(outcomes) != len(reference) or not questions or len(outcomes) % questions:
        raise ValueError(f"cannot pair {len(outcomes)} outcomes with {len(reference)} "
                         f"over {questions} questions")
    runs = len(outcomes) // questions
    per_question = []
    for q in range(questions):
        mine = sum(outcomes[r * questions + q] == "correct" for r in range(runs))
        theirs = sum(reference[r * questions + q] == "correct" for r in range(runs))
        per_question.append((mine - theirs) / runs)
    mean = sum(per_question) / questions
    if questions < 2:
        return {"difference": mean, "stderr": math.nan}
    variance = sum((d - mean) ** 2 for d in per_question) / (questions - 1)
    return {"difference": mean, "stderr": math.sqrt(variance / questions),
            "questions_changed": sum(d != 0 for d in per_question)}


def print_summary(result: dict) -> None:
    rows = []
    for name, v in result["modes"].items():
        diff = v.get("vs_non_shared", {})
        rows.append({"mode": name, "accuracy": v["accuracy"], "stderr": v["stderr"],
                     "vs_non_shared": diff.get("difference"), "diff_se": diff.get("stderr"),
                     "unfinished": v["unfinished_share"], "malformed": v["malformed_share"],
                     "prefilled": sum(v["prefilled"].values()), "seconds": v["seconds"]})
    print_table(rows, ["mode", "accuracy", "stderr", "vs_non_shared", "diff_se", "unfinished",
                       "malformed", "prefilled", "seconds"],
                title=f"ScienceQA agents: exact match of the option letter, {result['questions']} "
                      f"questions x {result['runs']} run(s) (chance {result['chance']:.3f})")
    groups = []
    for name, v in result["modes"].items():
        for key in ("per_band", "per_subject"):
            for group, s in v[key].items():
                groups.append({"mode": name, "group": group, "n": s["n"],
                               "accuracy": s["accuracy"], "stderr": s["stderr"],
                               "unfinished": s["unfinished_share"]})
    print_table(groups, ["mode", "group", "n", "accuracy", "stderr", "unfinished"],
                title="per grade band and subject")
