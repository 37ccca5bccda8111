"""Shared helpers of the benchmark and evaluation scripts: environment record, timing, ceilings,
tables and JSON output."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp


def entry_point() -> str:
    """How this process was started, as the user typed it: ``python -m eval`` (not the path of
    ``eval/__main__.py``), ``lragent-eval`` for a console script, else ``python SCRIPT``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    script = sys.argv[0] if sys.argv and sys.argv[0] else ""
    return f"python {script}".strip() if script.endswith(".py") or not script \
        else Path(script).name


def invoked_command(argv: Sequence[str] | None = None, prog: str | None = None) -> str:
    """``prog`` (default: ``entry_point()``) and the arguments (default ``sys.argv[1:]``), quoted
    for a shell."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([prog or entry_point(), *(shlex.quote(str(a)) for a in args)])


def environment(command: str | None = None) -> dict:
    """Device, versions, date and the command (default: this process's, as typed), for every
    results file."""
    device = jax.devices()[0]
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or invoked_command(),
        "platform": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import jaxlib

        info["jaxlib"] = jaxlib.__version__
    except Exception:  # pragma: no cover
        pass
    return info


def sync(tree):
    return jax.block_until_ready(tree)


def time_call(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> dict:
    """Median / min wall time of ``fn()`` (synchronised), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def measure_copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = nbytes // 4
    x = jax.random.normal(jax.random.key(1), (n,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    t = time_call(lambda: copy(x), warmup=2, repeats=repeats)["median_s"]
    return 2 * n * 4 / t


def measure_matmul_rate(size: int = 8192, repeats: int = 10, dtype=jnp.bfloat16) -> float:
    """Dense matmul FLOP/s on random data (never zeros)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (size, size), dtype)
    b = jax.random.normal(k2, (size, size), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    t = time_call(lambda: mm(a, b), warmup=2, repeats=repeats)["median_s"]
    return 2 * size ** 3 / t


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None) -> None:
    if title:
        print(f"\n{title}")
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.4g}"
    return str(value)


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default))
    tmp.replace(path)
    return path


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


class NullTokenizer:
    """For speed runs on random weights: token ids only, text is never needed."""

    eos_token_ids: tuple[int, ...] = ()
    vocab_size = 0

    def encode(self, text, add_bos=False):
        return []

    def decode(self, ids, skip_special_tokens=False):
        return ""



def tiny_config():
    """The random model of ``--model tiny`` / ``--quick``: ``ModelConfig.tiny_byte()``, the one
    ``python -m train --model tiny`` trains on (byte tokens)."""
    from lragent_jax.config import ModelConfig

    return ModelConfig.tiny_byte()


def load_eval_model(args):
    """The model of an eval run: ``args.model`` (None: embedded, 'tiny': random tiny) with
    ``args.adapters`` ('default': the shipped ones, 'random': untrained), ``args.dtype`` and
    ``args.attn``."""
    from lragent_jax.config import LoraConfig
    from lragent_jax.lora import init_adapters
    from lragent_jax.model import tiny_byte_params
    from lragent_jax.pretrained import Model, load_pretrained
    from lragent_jax.tokenizer import ByteTokenizer

    dtype = jnp.dtype(args.dtype)
    if args.model == "tiny":
        cfg = tiny_config()
        params = tiny_byte_params(dtype)  # the weights python -m train --model tiny has
        model = Model(config=cfg, params=params, tokenizer=ByteTokenizer(), attn_impl=args.attn)
    else:
        model = load_pretrained(args.model, dtype=dtype, attn_impl=args.attn)
    if args.adapters == "random":
        lora = LoraConfig(rank=8, targets=("q", "v", "o", "gate", "up", "down"))
        b_scale = 0.05 if args.model == "tiny" else 0.0
        make = jax.jit(lambda key: init_adapters(key, model.config, lora, dtype=dtype,
                                                 b_scale=b_scale))
        return model.with_adapters(make(jax.random.key(1)), lora)
    return model.load_adapters("default" if args.adapters is None else args.adapters, dtype=dtype)


def positive_int_list(text: str) -> list[int]:
    """argparse type of the benchmark scripts: comma-separated positive integers, e.g. 1,16."""
    values = csv_list(int)(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


def csv_list(kind):
    """argparse type: a comma-separated list of ``kind``."""
    def parse(text):
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}; got {text!r}") from None
    return parse
