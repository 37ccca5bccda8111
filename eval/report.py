"""Figures and tables for the README from saved GPU results (no model, no accelerator needed).

    python -m eval.report eval/results/h100-2026-11-22 \
        --accuracy "mixed-view adapters, greedy=eval_mixed/episodes.jsonl" \
        --accuracy "agent-view adapters, greedy=accuracy_agent_view.json"

Reads the efficiency JSON files (``efficiency*.json``; rows measured by ``python -m eval.efficiency``
win over rows transcribed from run logs, ``*from_log*.json``, and newer runs over older ones) and,
for ``--accuracy LABEL=PATH``, an accuracy run: its ``episodes.jsonl`` as ``python -m eval`` writes
it (rescored with the task's scorer) or a JSON holding per-mode aggregates (``results.json`` of
``python -m eval``, or ``{"accuracy": {mode: ...}}``). Paths are relative to the folder unless
absolute. Writes ``throughput_<attn>.png``, ``ttft.png``, ``memory.png``, ``accuracy.png`` and
``summary.json`` into the folder.
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


def accuracy_from_file(path: Path) -> dict:
    """Per-mode accuracy aggregates from an episodes.jsonl or a JSON of aggregates."""
    if path.suffix == ".jsonl":
        return accuracy_from_episodes(path)
    data = json.loads(path.read_text())
    acc = data.get("accuracy", data)
    acc = acc.get("modes", acc)
    if not isinstance(acc, dict) or not all(isinstance(v, dict) and "accuracy" in v
                                            for v in acc.values()) or not acc:
        raise ValueError(f"{path}: no per-mode accuracy found (expected episodes.jsonl, a "
                         "results.json of python -m eval, or {'accuracy': {mode: {...}}})")
    return acc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="folder of saved results; figures are written there")
    p.add_argument("--accuracy", action="append", default=[], metavar="LABEL=PATH",
                   help="an accuracy run to plot under LABEL (repeatable): episodes.jsonl or a "
                        "JSON of per-mode aggregates")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        p.error(f"not a folder: {folder}")
    summary: dict = {}

    rows = []
    files = [(f, json.loads(f.read_text())) for f in sorted(folder.glob("efficiency*.json"))]
    # measured before transcribed from logs, newest first (stable sorts)
    files.sort(key=lambda fd: fd[1].get("environment", {}).get("date", ""), reverse=True)
    files.sort(key=lambda fd: "from_log" in fd[0].name)
    for f, data in files:
        on_gpu = data.get("environment", {}).get("platform", "gpu") == "gpu"
        for r in data["rows"]:
            r = dict(r)
            if r.get("attn", "default") == "default" and on_gpu:
                r["attn"] = "triton"  # the platform's default attention on a GPU
            r.setdefault("tokens_s", r["length"] / r["e2e_s"])
            rows.append(r)
    if rows:
        # one row per (model, attention, length, mode): the first in priority order
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

    if args.accuracy:
        runs = {}
        for item in args.accuracy:
            label, sep, path = item.rpartition("=")
            if not sep or not label:
                p.error(f"--accuracy takes LABEL=PATH; got {item!r}")
            path = Path(path) if Path(path).is_absolute() else folder / path
            if not path.is_file():
                p.error(f"--accuracy {label!r}: no such file {path}")
            runs[label] = accuracy_from_file(path)
        summary["accuracy"] = runs
        plots.plot_accuracy(runs, folder / "accuracy.png")
    (folder / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote figures and summary.json into {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
