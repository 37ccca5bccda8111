"""PNG plots of evaluation results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODE_ORDER = ("non_shared", "fully_shared", "base_shared", "base_lowrank_shared")
COLORS = {"non_shared": "tab:gray", "fully_shared": "tab:orange", "base_shared": "tab:blue",
          "base_lowrank_shared": "tab:green"}


def _modes(keys):
    return [m for m in MODE_ORDER if m in keys]


def plot_throughput(rows, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for style, model in zip(("-", "--", ":", "-."), sorted({r["model"] for r in rows})):
        for mode in _modes({r["mode"] for r in rows}):
            pts = sorted((r["length"], r["tokens_s"]) for r in rows
                         if r["model"] == model and r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=COLORS[mode], linestyle=style,
                        label=f"{mode} ({model})" if len({r['model'] for r in rows}) > 1 else mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("episode length (tokens)")
    ax.set_ylabel("trajectory tokens / s (end to end)")
    ax.set_title("Throughput vs context length")
    ax.grid(alpha=0.3)
    return _save(fig, ax, path)


def plot_ttft(rows, path: Path) -> Path:
    longest = max(r["length"] for r in rows)
    model = sorted({r["model"] for r in rows})[-1]
    sel = {r["mode"]: r for r in rows if r["length"] == longest and r["model"] == model}
    fig, ax = plt.subplots(figsize=(7, 4))
    modes = _modes(sel)
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        ttft = sel[mode]["ttft_s"]
        ax.bar([t + i * width for t in range(len(ttft))], [v * 1e3 for v in ttft], width,
               color=COLORS[mode], label=mode)
    ax.set_xlabel("turn of the episode")
    ax.set_ylabel("time to first token (ms)")
    ax.set_yscale("log")
    ax.set_title(f"TTFT per turn ({model}, {longest} tokens)")
    return _save(fig, ax, path)


def _grouped_bars(ax, groups: dict, value, error=None, label_size=8) -> None:
    """One group of bars per label of ``groups`` ({label: {mode: entry}}), one bar per mode."""
    labels = list(groups)
    modes = _modes({m for v in groups.values() for m in v})
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        entries = [groups[label].get(mode) for label in labels]
        ax.bar([j + i * width for j in range(len(labels))], [value(e) for e in entries], width,
               yerr=None if error is None else [error(e) for e in entries],
               capsize=3 if error else 0, color=COLORS[mode], label=mode)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=label_size)


def _save(fig, ax, path: Path) -> Path:
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_memory(memory: dict, path: Path) -> Path:
    """``memory``: {label: {mode: bytes}}."""
    fig, ax = plt.subplots(figsize=(6, 4))
    _grouped_bars(ax, memory, lambda b: (b or 0) / 2**30, label_size=7)
    ax.set_ylabel("KV cache (GiB)")
    ax.set_title("Cache memory per mode (3 agents)")
    return _save(fig, ax, path)


def plot_accuracy(accuracy: dict, path: Path) -> Path:
    """``accuracy``: {label: {mode: {"accuracy", "stderr"}}}."""
    fig, ax = plt.subplots(figsize=(6, 4))
    _grouped_bars(ax, accuracy, lambda e: (e or {}).get("accuracy", 0),
                  error=lambda e: (e or {}).get("stderr", 0))
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Task accuracy per mode (± standard error)")
    return _save(fig, ax, path)
