"""Teacher-forced comparison of the sharing modes: no sampling, only each mode's cache.

A gold episode (segments with writers) is replayed turn by turn: the env text before a role's
segment is appended in that role's turn and the role's segment is scored token by token (log-prob and
whether it is the greedy choice) under the role's view of the cache in the given mode. Non-shared is
exact; where another mode's view differs (another agent's adapter baked into V, base entries computed
by another agent's forward), the difference from non-shared is the price of sharing.

Published-format samples (``{"input", "output"}``, e.g. the ScienceQA role files) have no segments:
``segment_published_sample`` recovers who wrote which part of the input from its markers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lragent_jax.cache import ALL_MODES, ShareMode
from lragent_jax.session import Session, Turn
from lragent_jax.workflow import ENV, Segment


def episode_turns(segments: Sequence[Segment]) -> list[tuple[str, list[str], str]]:
    """[(role, env texts appended before it, role text)] of an episode's segments."""
    turns, pending = [], []
    for s in segments:
        if s.writer == ENV:
            pending.append(s.text)
        else:
            turns.append((s.writer, pending, s.text))
            pending = []
    return turns


def replay_scores(session: Session, episodes: Sequence[Sequence[Segment]], *,
                  score_roles: Sequence[str] | None = None,
                  only_last: bool = False, on_chunk=None) -> list[dict]:
    """Replay episodes (``session.batch`` at a time) and score every role segment.

    Returns one dict per scored segment: episode, turn, role, n tokens, sum of log-probs, greedy
    matches. ``only_last``: score only each episode's last role segment (the others still run, as
    teacher-forced turns that fill the cache). ``on_chunk(episodes)``: called after each batch of
    episodes with how many it replayed (progress).
    """
    tok = session.tokenizer
    out = []
    for offset in range(0, len(episodes), session.batch):
        chunk = [episode_turns(e) for e in episodes[offset:offset + session.batch]]
        session.reset()
        for step in range(max((len(t) for t in chunk), default=0)):
            turns, meta = {}, {}
            for row, episode in enumerate(chunk):
                if step >= len(episode):
                    continue
                role, env, text = episode[step]
                ids = [t for piece in env for t in tok.encode(piece)]
                target = tok.encode(text) if text else []
                if not target:  # an empty output: nothing to score, append the env only
                    session.append_tokens(row, ids)
                    continue
                turns[row] = Turn(role, append_ids=tuple(ids), score_tokens=tuple(target))
                meta[row] = (role, len(episode))
            if not turns:
                continue
            results = session.turn(turns)
            for row, res in results.items():
                role, n_turns = meta[row]
                if only_last and step != n_turns - 1:
                    continue
                if score_roles is not None and role not in score_roles:
                    continue
                out.append({"episode": offset + row, "turn": step, "role": role,
                            "tokens": int(len(res.logprobs)),
                            "logprob_sum": float(np.sum(res.logprobs)),
                            "greedy_matches": int(np.sum(res.greedy_match)),
                            "logprobs": res.logprobs.tolist()})
        if on_chunk is not None:
            on_chunk(len(chunk))
    return out


def compare_modes(make_session, episodes: Sequence[Sequence[Segment]], *, modes=ALL_MODES,
                  only_last: bool = False, log=print, on_chunk=None) -> dict:
    """Per mode and role: mean log-prob per token, token accuracy, and the gap to non-shared.

    ``make_session(mode)`` returns a fresh session of that mode. The gap is computed token by token
    on the same tokens (paired), so it isolates what the cache changes. ``on_chunk``: see
    ``replay_scores`` (called for every mode's batches).
    """
    per_mode = {}
    for mode in modes:
        mode = ShareMode.parse(mode).value
        per_mode[mode] = replay_scores(make_session(mode), episodes, only_last=only_last,
                                       on_chunk=on_chunk)
        log(f"  teacher-forced {mode}: {len(per_mode[mode])} segments scored")
    reference = per_mode.get("non_shared")
    summary = {}
    for mode, scores in per_mode.items():
        roles = sorted({s["role"] for s in scores})
        summary[mode] = {}
        for role in roles + ["all"]:
            rows = [s for s in scores if role == "all" or s["role"] == role]
            n = sum(s["tokens"] for s in rows)
            entry = {"segments": len(rows), "tokens": n,
                     "logprob_per_token": sum(s["logprob_sum"] for s in rows) / max(n, 1),
                     "token_accuracy": sum(s["greedy_matches"] for s in rows) / max(n, 1)}
            if reference is not None:
                ref_rows = [s for s in reference if role == "all" or s["role"] == role]
                diffs = np.concatenate([np.asarray(a["logprobs"]) - np.asarray(b["logprobs"])
                                        for a, b in zip(rows, ref_rows)] or [np.zeros(0)])
                entry["logprob_gap_vs_non_shared"] = float(diffs.mean()) if diffs.size else 0.0
                entry["abs_logprob_gap_vs_non_shared"] = (float(np.abs(diffs).mean())
                                                          if diffs.size else 0.0)
                entry["token_accuracy_gap_vs_non_shared"] = (
                    entry["token_accuracy"]
                    - sum(s["greedy_matches"] for s in ref_rows) / max(n, 1))
            summary[mode][role] = entry
    return summary


def print_comparison(tf: dict) -> None:
    """The table of ``compare_modes``' result: per mode and role, log-prob per token (nats) and token
    accuracy, and their gaps to non-shared."""
    from eval.common import print_table

    rows = []
    for mode, roles in tf.items():
        for role, v in roles.items():
            rows.append({"mode": mode, "role": role, "tokens": v["tokens"],
                         "logprob/token": v["logprob_per_token"],
                         "token_acc": v["token_accuracy"],
                         "gap_vs_non_shared": v.get("logprob_gap_vs_non_shared"),
                         "acc_gap": v.get("token_accuracy_gap_vs_non_shared")})
    print_table(rows, ["mode", "role", "tokens", "logprob/token", "token_acc",
                       "gap_vs_non_shared", "acc_gap"],
                title="teacher-forced per mode and role (log-prob in nats per output token; gaps "
                      "against non-shared on the same tokens)")


def run_scienceqa(ctx) -> dict:
    """The ``scienceqa`` part of ``python -m eval``: the held-out published samples, replayed through
    each mode with ``--scienceqa-adapters`` (see ``eval.parts``)."""
    import argparse

    from eval.common import load_eval_model
    from lragent_jax.tasks.scienceqa import load_role_files
    from lragent_jax.workflow.samples import split_validation

    args, modes = ctx.args, ctx.modes
    folder = args.scienceqa_dir or default_scienceqa_dir()
    if folder is None:
        print("\n== scienceqa: skipped (published trajectories not found; --scienceqa-dir)")
        return {"skipped": "published trajectories not found"}
    if args.scienceqa_adapters is None:
        print("\n== scienceqa: skipped (no --scienceqa-adapters given)")
        return {"skipped": "no --scienceqa-adapters"}
    print(f"\n== scienceqa: teacher-forced comparison on {folder}")
    model = load_eval_model(argparse.Namespace(**{**vars(args),
                                                  "adapters": args.scienceqa_adapters}))
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
    if not episodes:
        raise ValueError(f"scienceqa: no held-out sample of {folder} fits --scienceqa-max-tokens "
                         f"{args.scienceqa_max_tokens}")
    capacity = 1 << (args.scienceqa_max_tokens + 64 - 1).bit_length()
    # rows: --batch (on a GPU all samples in one batch: every turn of them one call); episodes of
    # every mode on the progress bar (a mode of 78 samples is minutes on a CPU)
    rows = min(args.batch, len(episodes))
    print(f"  {rows} rows of {capacity} tokens, {-(-len(episodes) // rows)} batch(es) a mode "
          f"(--batch), modes {', '.join(modes)}")
    with ctx.progress("samples (all modes)", len(modes) * len(episodes)) as bar:
        tf = compare_modes(lambda mode: model.session(mode, batch=rows,
                                                      capacity=capacity, prefill_chunk=1024,
                                                      min_chunk_bucket=args.min_bucket),
                           episodes, modes=modes, only_last=True, log=lambda line: None,
                           on_chunk=lambda n: bar.update(advance=n))
    print_comparison(tf)
    return {"folder": str(folder), "samples": len(episodes), "skipped_long": skipped,
            "held_out": {"fraction": args.scienceqa_valid_fraction,
                         "seed": args.scienceqa_split_seed},
            "comparison": tf}


def default_scienceqa_dir():
    """The published ScienceQA role files beside the project, if present."""
    import os
    from pathlib import Path

    candidates = []
    if os.environ.get("LRAGENT_DATA_DIR"):
        candidates.append(Path(os.environ["LRAGENT_DATA_DIR"]) / "scienceqa")
    repo = Path(__file__).resolve().parent.parent
    candidates += [repo.parent / "shared" / "data" / "lragent-trajectories" / "scienceqa",
                   Path.cwd().parent / "shared" / "data" / "lragent-trajectories" / "scienceqa"]
    return next((c for c in candidates if (c / "plan.json").is_file()), None)


# --------------------------------------------------------------------------------------------------
# published-format samples


def segment_published_sample(sample: dict, role: str) -> list[Segment]:
    """Segments (with writers) of a published ``{"input", "output"}`` sample, ending with the
    sample's own output as ``role``'s segment (``lragent_jax.tasks.scienceqa``: who wrote what is
    recovered from the ReAct markers; a prompt that does not follow them is refused)."""
    from lragent_jax.tasks.scienceqa import segment_published_sample as segment

    return segment(sample, role)
