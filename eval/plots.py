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
    """One group of bars per label of ``groups`` ({label: {mode: entry}}), one bar per mode, with
    symmetric error bars ``error(entry)`` when given."""
    labels = list(groups)
    modes = _modes({m for v in groups.values() for m in v})
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        entries = [groups[label].get(mode) for label in labels]
        ax.bar([j + i * width for j in range(len(labels))], [value(e) for e in entries], width,
               yerr=None if error is None else [error(e) for e in entries],
               capsize=4 if error else 0, color=COLORS[mode], label=mode,
               error_kw={"elinewidth": 1.2, "capthick": 1.2, "ecolor": "black"})
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=label_size)


def _save(fig, ax, path: Path, *, legend_below: bool = False) -> Path:
    """Legend outside the axes (right, or below the figure), so it never covers the data."""
    handles, labels = ax.get_legend_handles_labels()
    if legend_below:
        fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(len(labels), 4),
                   frameon=False)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    else:
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)
        fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _unit(largest_bytes: float) -> tuple[float, str]:
    for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if largest_bytes >= scale:
            return scale, name
    return 1, "bytes"


def plot_memory(memory: dict, path: Path) -> Path:
    """``memory``: {label: {mode: bytes}}. One panel per label, each on its own scale, so a
    135M model's cache shows beside an 8B one's."""
    labels = list(memory)
    fig, axes = plt.subplots(1, len(labels), figsize=(2.6 * len(labels) + 1.0, 3.8),
                             squeeze=False)
    for ax, label in zip(axes[0], labels):
        values = memory[label]
        scale, unit = _unit(max(values.values(), default=1))
        modes = _modes(values)
        bars = ax.bar(range(len(modes)), [values[m] / scale for m in modes],
                      color=[COLORS[m] for m in modes], label=modes)
        for bar, m in zip(bars, modes):
            ratio = values[m] / values["non_shared"] if values.get("non_shared") else None
            if ratio is not None:
                ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks([])
        ax.set_title(label, fontsize=8)
        ax.set_ylabel(f"cache per trajectory ({unit})", fontsize=8)
        ax.set_ylim(0, max(values.values()) / scale * 1.15)
    fig.suptitle("Cache memory per mode (3 agents; ratio to non_shared)", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[m]) for m in _modes(memory[labels[0]])]
    fig.legend(handles, _modes(memory[labels[0]]), fontsize=7, loc="lower center",
               ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_accuracy(accuracy: dict, path: Path, *, note: str | None = None) -> Path:
    """``accuracy``: {label: {mode: {"accuracy", "stderr"}}}; ``note`` is written under the title
    (e.g. that too few questions ran to tell the modes apart)."""
    fig, ax = plt.subplots(figsize=(7, 4))

    def stderr(e):
        s = (e or {}).get("stderr", 0)
        return 0 if s != s else s  # NaN (one question) draws no bar

    _grouped_bars(ax, accuracy, lambda e: (e or {}).get("accuracy", 0), error=stderr)
    top = max((e.get("accuracy", 0) + stderr(e) for v in accuracy.values() for e in v.values()),
              default=1)
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, max(1.0, top) * 1.08)  # whole error bars, above 1 too
    ax.axhline(1.0, color="gray", linewidth=0.6, linestyle=":")
    ax.set_title("Task accuracy per mode (± standard error)" + (f"\n{note}" if note else ""),
                 fontsize=10)
    return _save(fig, ax, path)
