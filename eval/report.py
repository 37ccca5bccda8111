"""Figures and tables for the README from saved GPU results (no model, no accelerator needed).

    python -m eval.report eval/results/h100-2026-11-22 [--episodes EPISODES.jsonl]

Reads the efficiency JSON files (``efficiency*.json``), the teacher-forced comparison
(``teacher_forced*.json``) and, when given, the episodes of an accuracy run (``episodes.jsonl`` as
``python -m eval`` writes it), and writes ``throughput.png``, ``ttft.png``, ``memory.png``,
``accuracy.png`` and ``summary.json`` into the folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval import plots
from lragent_jax.cache import ALL_MODES, analytic_cache_bytes
from lragent_jax.config import ModelConfig
from lragent_jax.tasks.scoring import aggregate, score_episode


def accuracy_from_episodes(path: Path) -> dict:
    """Accuracy per mode, recomputed from the episode records with the task's scorer."""
    by_mode: dict[str, list] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        task = record["task"]

        class _Record:  # the scorer reads answer / finished / malformed / steps
            answer, finished = record["answer"], record["finished"]
            malformed, steps = record["malformed"], record["steps"]

        by_mode.setdefault(record["mode"], []).append(
            score_episode(_Record, task["answer"], level=task.get("level"), id=task.get("id")))
    return {mode: aggregate(outcomes).to_dict() for mode, outcomes in by_mode.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="folder of saved results; figures are written there")
    p.add_argument("--episodes", help="episodes.jsonl of an accuracy run")
    p.add_argument("--label", default="SmolLM2-135M + shipped adapters (greedy)")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        p.error(f"not a folder: {folder}")
    summary: dict = {}

    rows = []
    for f in sorted(folder.glob("efficiency*.json")):
        data = json.loads(f.read_text())
        on_gpu = data.get("environment", {}).get("platform", "gpu") == "gpu"
        for r in data["rows"]:
            r = dict(r)
            if r.get("attn", "default") == "default" and on_gpu:
                r["attn"] = "triton"  # the platform's default attention on a GPU
            r.setdefault("tokens_s", r["length"] / r["e2e_s"])
            rows.append(r)
    if rows:
        # one row per (model, attention, length, mode): measured JSON wins over log transcripts
        unique = {}
        for r in rows:
            unique.setdefault((r["model"], r.get("attn", "default"), r["length"], r["mode"]), r)
        rows = list(unique.values())
        summary["efficiency"] = rows
        for attn in sorted({r.get("attn", "default") for r in rows}):
            sel = [r for r in rows if r.get("attn", "default") == attn]
            plots.plot_throughput(sel, folder / f"throughput_{attn}.png")
        with_ttft = [r for r in rows if "ttft_s" in r]
        if with_ttft:
            plots.plot_ttft(with_ttft, folder / "ttft.png")

    memory = {label: {m.value: analytic_cache_bytes(cfg, m, num_agents=3, capacity=cap,
                                                    rank=8)["total"] for m in ALL_MODES}
              for label, cfg, cap in (("SmolLM2-135M @ 2k", ModelConfig.smollm2_135m(), 2048),
                                      ("Llama-3.1-8B @ 16k", ModelConfig.llama3_1_8b(), 16384),
                                      ("Llama-3.1-8B @ 32k", ModelConfig.llama3_1_8b(), 32768))}
    summary["memory"] = memory
    plots.plot_memory(memory, folder / "memory.png")

    if args.episodes:
        acc = accuracy_from_episodes(Path(args.episodes))
        summary["accuracy"] = acc
        plots.plot_accuracy({args.label: acc}, folder / "accuracy.png")
    (folder / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote figures and summary.json into {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
